"""SPIN-Diffusion: iterations (learning rate, fresh optimiser, frozen reference), opponents sampled by the previous
iteration's weights and cached, exact resume inside an iteration, and learning toward the real images."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from diffrl.errors import UserInputError
from diffrl.lora import load_lora_into
from diffrl.trainers.pairs import generate_latents, lora_values, record_seed, records_of_steps
from diffrl.training import build_run, train
from tests.fixtures import fast_config, straight_and_resumed_states
from tests.trainers.preference_fixtures import implicit_margins

DATA = ["spin.dataset=assets/datasets/shapes", "spin.dataset_limit=8", "sample.batch_size=2"]
TWO_ITERATIONS = ("spin.iterations=[{learning_rate: 1.0e-2, beta: 2000, steps: 2}, "
                  "{learning_rate: 3.0e-3, beta: 5000, steps: 2}]")


def _config(*overrides):
    return fast_config("trainer=spin", *DATA, *overrides)


def test_iterations_set_their_learning_rate_and_restart_the_optimiser(tmp_path):
    run = build_run(_config(TWO_ITERATIONS, "train.steps=4"), tmp_path)
    trainer, optimizer = run.trainer, run.optimization.optimizer
    assert [trainer.iteration_of(step) for step in range(5)] == [0, 0, 1, 1, 1]
    for step in range(3):
        trainer.step(["", ""])
        learning_rate = 1e-2 if step < 2 else 3e-3
        assert optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate)
        assert run.optimization.lr_scheduler.get_last_lr()[0] == pytest.approx(learning_rate)
    # step 3 began iteration 2 with an empty AdamW state, so it holds exactly one step of moments
    assert all(state["step"] == 1 for state in optimizer.state.values())
    assert trainer.iteration == 1


def test_opponents_come_from_the_previous_iteration_not_the_base_model(tmp_path):
    """Iteration 2's cached opponents equal samples of the weights at the end of iteration 1 (its checkpoint), with
    the seeds of iteration 2; the base model's samples with those seeds differ."""
    config = _config(TWO_ITERATIONS, "train.steps=3", "log.checkpoint_every=2", "log.grid_every=100",
                     "train.learning_rate=1.0e-2")
    train(config, tmp_path / "run", quiet=True)
    cached = load_file(tmp_path / "run" / "spin" / "opponents-iteration-2.safetensors")["latents"]
    run = build_run(_config(TWO_ITERATIONS, "train.steps=3"), tmp_path / "check")
    trainer, all_prompts = run.trainer, run.trainer.dataset.prompts

    def samples(k):   # the opponents' records of iteration k (1-based), seeded as the trainer seeds them
        records = records_of_steps(len(all_prompts), trainer.iteration_steps(k - 1), 2, 0)
        return generate_latents(run.sampler, [all_prompts[i] for i in records],
                                [record_seed(0, k, i) for i in records], 8)

    with run.sampler.base_model():
        base = samples(2)
        first = load_file(tmp_path / "run" / "spin" / "opponents-iteration-1.safetensors")["latents"]
        torch.testing.assert_close(first, samples(1), rtol=0, atol=1e-5)
    load_lora_into(run.pipe.unet, tmp_path / "run" / "checkpoints" / "step-000002")   # the end of iteration 1
    previous = samples(2)
    torch.testing.assert_close(cached, previous, rtol=0, atol=1e-5)
    assert (cached - base).abs().max() > 1e-2


def test_reference_is_the_frozen_previous_iteration(tmp_path):
    """Inside iteration 2 the reference calls see the LoRA values of the iteration's start, the policy its own."""
    run = build_run(_config(TWO_ITERATIONS, "train.steps=4", "train.learning_rate=1.0e-2"), tmp_path)
    for _ in range(3):
        run.trainer.step(["", ""])
    params, frozen = run.optimization.params, run.trainer.frozen
    assert max((p - f).abs().max() for p, f in zip(params, frozen)) > 0
    with lora_values(params, frozen):
        assert all(torch.equal(p, f) for p, f in zip(params, frozen))
    assert not all(torch.equal(p, f) for p, f in zip(params, frozen))


def test_resume_inside_an_iteration_reads_its_opponents_back(tmp_path):
    iterations = ("spin.iterations=[{learning_rate: 1.0e-2, beta: 2000, steps: 1}, "
                  "{learning_rate: 3.0e-3, beta: 5000, steps: 3}]")
    state_a, state_b = straight_and_resumed_states(_config, tmp_path, iterations)
    assert state_a["iteration"] == state_b["iteration"] == 1 and state_a["steps_done"] == 4
    assert all(torch.equal(a, b) for a, b in zip(state_a["frozen"], state_b["frozen"]))
    opponents = [load_file(tmp_path / run / "spin" / "opponents-iteration-2.safetensors")["latents"]
                 for run in ("straight", "resumed")]
    assert torch.equal(*opponents)


def test_bad_iteration_plans_are_refused(tmp_path):
    with pytest.raises(UserInputError, match="more than spin.iterations plan"):
        build_run(_config(TWO_ITERATIONS, "train.steps=5"), tmp_path)
    with pytest.raises(UserInputError, match="multiple of train.gradient_accumulation_steps"):
        build_run(_config(TWO_ITERATIONS, "train.steps=4", "train.gradient_accumulation_steps=4"), tmp_path)
    with pytest.raises(UserInputError, match="spin.dataset is not set"):
        build_run(fast_config("trainer=spin", "train.steps=10"), tmp_path)


@pytest.mark.slow
def test_learning_prefers_the_real_images_over_the_opponents(tmp_path):
    """20 steps on 64 real shapes images against the tiny model's own samples: on noise it never trained on, the
    policy denoises the real images better, relative to the frozen reference, than its opponents (measured: margin
    1.1e-2, all 64 pairs right; a sign error drives it negative)."""
    torch.set_num_threads(2)
    run = build_run(_config("spin.dataset_limit=64", "sample.batch_size=8",
                            "spin.iterations=[{learning_rate: 1.0e-3, beta: 4000, steps: 20}]", "train.steps=20"),
                    tmp_path)
    first = run.trainer.step([""] * 8)
    for _ in range(19):
        last = run.trainer.step([""] * 8)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and last["loss"] < 0.6
    records = sorted(run.trainer.opponent_rows, key=run.trainer.opponent_rows.get)   # in opponent row order
    margins = implicit_margins(run, records, run.trainer.opponents, timesteps=torch.arange(1000),
                               reference=lambda: lora_values(run.optimization.params, run.trainer.frozen))
    assert margins.mean() > 3e-3 and (margins > 0).float().mean() > 0.9, margins
