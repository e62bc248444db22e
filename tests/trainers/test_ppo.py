"""What DDPO and LOOP share (diffrl.trainers.ppo): refusals, on-policy start, accumulation and step counts."""

from __future__ import annotations

import math

import pytest
import torch

import diffrl.trainers.dpok as dpok
import diffrl.trainers.ppo as ppo
from diffrl.errors import UserInputError
from diffrl.policy_gradient import ppo_clipped_loss
from diffrl.training import build_run, prompts_for_step
from tests.fixtures import RECOMPUTE_ATOL, assert_same_gradients, fast_config

STOCHASTIC = ["sample.eta=1.0"]
PROMPTS = ["a red circle", "a blue square", "a red circle", "a green tree"]


def _run(tmp_path, trainer, *overrides):
    return build_run(fast_config(f"trainer={trainer}", *STOCHASTIC, *overrides), tmp_path)


class SurrogateRecorder:
    """Wraps ppo_clipped_loss to record the ratios each backward pass starts from."""

    def __init__(self):
        self.ratios = []

    def __call__(self, log_probs, old_log_probs, advantages, clip_range):
        self.ratios.append((log_probs.detach() - old_log_probs).exp())
        return ppo_clipped_loss(log_probs, old_log_probs, advantages, clip_range)


@pytest.mark.parametrize("trainer", ["ddpo", "loop", "dpok"])
def test_deterministic_sampler_is_refused(tmp_path, trainer):
    with pytest.raises(UserInputError, match="sample.eta"):
        build_run(fast_config(f"trainer={trainer}", "sample.eta=0.0"), tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["ddpo.train_batch_size=3"], "multiple of ddpo.train_batch_size"),
    (["ddpo.train_batch_size=2", "train.gradient_accumulation_steps=4"], "gradient_accumulation_steps"),
    (["ddpo.timestep_fraction=0.1"], "timestep_fraction"),
    (["ddpo.inner_epochs=0"], "inner_epochs"),
])
def test_settings_that_would_straddle_rollouts_are_refused(tmp_path, overrides, message):
    with pytest.raises(UserInputError, match=message):
        _run(tmp_path, "ddpo", *overrides)


@pytest.mark.parametrize("trainer, overrides", [("ddpo", []), ("loop", ["sample.batch_size=2",
                                                                        "loop.samples_per_prompt=2"])])
def test_first_inner_update_starts_on_policy(tmp_path, monkeypatch, trainer, overrides):
    """Before the first optimiser step the recomputed log-probs equal the sampling ones: ρ = 1."""
    recorder = SurrogateRecorder()
    monkeypatch.setattr(ppo, "ppo_clipped_loss", recorder)
    run = _run(tmp_path, trainer, "train.learning_rate=1.0e-2", "ddpo.inner_epochs=2", "loop.inner_epochs=2",
               *overrides)
    run.trainer.step(PROMPTS[:run.config.sample.batch_size])
    slots = run.config.sample.num_steps
    assert len(recorder.ratios) == 2 * slots          # 2 epochs × 1 micro-batch × 4 timesteps
    first_epoch, second_epoch = torch.cat(recorder.ratios[:slots]), torch.cat(recorder.ratios[slots:])
    torch.testing.assert_close(first_epoch, torch.ones_like(first_epoch), rtol=0, atol=RECOMPUTE_ATOL)
    assert (second_epoch - 1).abs().max() > 1e-5       # the first epoch's step moved the policy


@pytest.mark.parametrize("trainer", ["ddpo", "loop", "dpok"])
def test_deterministic_last_step_is_never_trained(tmp_path, monkeypatch, alpha_one_model, trainer):
    """With a σ = 0 last step (set_alpha_to_one) the trainers train only the sampler's stochastic steps: the loss is
    finite, step 3 of 4 is never recomputed, and the first update starts at ρ = 1. (Drawing the last step made its
    log-prob −inf and the loss NaN.)"""
    recorder = SurrogateRecorder()
    monkeypatch.setattr(ppo, "ppo_clipped_loss", recorder)
    monkeypatch.setattr(dpok, "clamped_ratio_loss", recorder)
    run = _run(tmp_path, trainer, f"model={alpha_one_model}", "sample.batch_size=2", "loop.samples_per_prompt=2",
               "dpok.v_batch_size=8")
    assert run.sampler.stochastic_steps == [0, 1, 2]
    recomputed_steps = []
    transition_log_prob = run.sampler.transition_log_prob

    def recording(latents, next_latents, i, *args, **kwargs):
        recomputed_steps.extend(torch.as_tensor(i).flatten().tolist())
        return transition_log_prob(latents, next_latents, i, *args, **kwargs)

    monkeypatch.setattr(run.sampler, "transition_log_prob", recording)
    metrics = run.trainer.step(PROMPTS[:2])
    assert all(math.isfinite(value) for value in metrics.values()), metrics
    assert recomputed_steps and set(recomputed_steps) <= {0, 1, 2}
    if trainer == "dpok":
        assert set(run.trainer.buffer.steps.tolist()) == {0, 1, 2}
    else:
        assert set(recomputed_steps) == {0, 1, 2}            # every stochastic step, once per trajectory
    first = recorder.ratios[0]                               # before any optimiser step
    torch.testing.assert_close(first, torch.ones_like(first), rtol=0, atol=RECOMPUTE_ATOL)


def test_optimizer_steps_follow_epochs_micro_batches_and_accumulation(tmp_path, monkeypatch):
    recorder = SurrogateRecorder()
    monkeypatch.setattr(ppo, "ppo_clipped_loss", recorder)
    run = _run(tmp_path, "ddpo", "ddpo.inner_epochs=2", "ddpo.train_batch_size=1", "ddpo.timestep_fraction=0.5",
               "train.gradient_accumulation_steps=2", "train.lr_scheduler=linear", "train.steps=3")
    assert type(run.trainer).optimizer_steps_per_step(run.config) == 4   # 2 epochs × 4 rows / (1 × 2)
    run.trainer.step(PROMPTS)
    assert len(recorder.ratios) == 2 * 4 * 2                             # epochs × micro-batches × ⌊4 · 0.5⌋
    adam_steps = {int(state["step"]) for state in run.state.optimizer.optimizer.state.values()}
    assert adam_steps == {4}
    # the linear schedule spans 3 steps × 4 optimiser steps: a third of the way down after one trainer step
    torch.testing.assert_close(run.state.lr_scheduler.get_last_lr()[0], run.config.train.learning_rate * 8 / 12)


def test_batch_4_equals_batch_2_with_accumulation_2(tmp_path):
    """The same rollout gives the same update whether trained as one micro-batch of 4 or two accumulated of 2."""
    def after_one_step(train_batch: int, accumulation: int):
        run = _run(tmp_path / f"b{train_batch}", "ddpo", f"ddpo.train_batch_size={train_batch}",
                   f"train.gradient_accumulation_steps={accumulation}", "train.learning_rate=1.0e-2",
                   "train.max_grad_norm=1.0e6")
        torch.manual_seed(0)                                            # the rollout's noise
        run.trainer.step(prompts_for_step(run.prompts, 0, 4, seed=0))
        optimizer = run.state.optimizer.optimizer
        moments = [optimizer.state[p]["exp_avg"].clone() for p in optimizer.param_groups[0]["params"]]
        return moments

    whole, accumulated = after_one_step(4, 1), after_one_step(2, 2)
    assert max(m.abs().max() for m in whole) > 0
    assert_same_gradients(accumulated, whole)


@pytest.mark.parametrize("trainer", ["ddpo", "loop", "dpok"])
def test_non_differentiable_reward_runs_without_a_graph(tmp_path, trainer):
    run = _run(tmp_path, trainer, "reward=compressibility", "sample.batch_size=2", "loop.samples_per_prompt=2",
               "dpok.v_batch_size=8")
    metrics = run.trainer.step(PROMPTS[:2])
    assert "reward/compressibility" in metrics and metrics["reward_mean"] < 0     # −kB: JPEG size is positive
