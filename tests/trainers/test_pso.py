"""PSO: the online update's gradient against the loss written out on the trainer's own trajectories, the initial
student as reference, offline pairs and their cache, exact resume, and learning in both modes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffrl.training import build_run, prompts_for_step
from tests.conftest import perturb_lora
from tests.fixtures import assert_same_gradients, fast_config, straight_and_resumed_states
from tests.trainers.preference_fixtures import implicit_margins

# LCM-LoRA-like student: 4 LCM steps, small CFG; SD-Turbo-like: Euler ancestral on trailing timesteps, no CFG.
LCM = ["sample.scheduler=lcm", "sample.num_steps=4", "sample.guidance_scale=1.5"]
TURBO = ["sample.scheduler=euler_ancestral", "sample.schedule=trailing", "sample.num_steps=4",
         "sample.guidance_scale=0.0"]
OFFLINE = ["pso.mode=offline", "pso.dataset=assets/datasets/shapes", "pso.dataset_limit=16"]


def _config(*overrides):
    return fast_config("trainer=pso", "sample.batch_size=2", *overrides)


def _run(tmp_path, *overrides):
    return build_run(_config(*overrides), tmp_path)


class RecordedUpdates:
    """Optimization.step replaced by a plain backward: the gradients of every loss the trainer passes, summed."""

    def __init__(self, optimization):
        self.losses = []
        optimization.step = self

    def __call__(self, loss):
        self.losses.append(loss.detach())
        loss.backward()


@pytest.mark.parametrize("student", [TURBO, LCM], ids=["turbo", "lcm"])
def test_online_loss_is_log_two_at_initialisation(tmp_path, student):
    """Policy = initial student exactly (LoRA up-weights start at 0): every per-step ratio is 1."""
    run = _run(tmp_path, *student)
    metrics = run.trainer.step(["a red circle", "a blue square"])
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6) and metrics["preference_accuracy"] == 0.0


def test_online_gradient_is_the_pairwise_loss_over_stochastic_steps(tmp_path):
    """The trainer's summed gradient equals that of Σ_s −log σ(β (clamp(log r_win) − clamp(log r_lose))) / B written
    here from the sampler's log-probs, the winner picked from the rewards of the trajectories it sampled."""
    run = _run(tmp_path, *TURBO, "pso.beta=50")
    perturb_lora(run.pipe.unet, scale=0.3)
    sampler, trainer, params = run.sampler, run.trainer, run.optimization.params
    sampled = []
    original = sampler.sample
    sampler.sample = lambda prompts, **kw: sampled.append(original(prompts, **kw)) or sampled[-1]
    RecordedUpdates(run.optimization)
    trainer.step(["a red circle", "a blue square"])
    got = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    traj = sampled[0]
    rewards = run.reward(traj.images, traj.prompts).float()
    winner_first = rewards[:2] > rewards[2:]
    total = 0
    for s in sampler.stochastic_steps:
        args = (traj.latents[:, s], traj.latents[:, s + 1], s, traj.prompt_embeds, traj.negative_prompt_embeds)
        with torch.no_grad():
            reference = sampler.transition_log_prob(*args, reference=True)[0]
        log_r = (sampler.transition_log_prob(*args)[0] - reference).clamp(math.log(0.9), math.log(1.1))
        margin = torch.where(winner_first, log_r[:2] - log_r[2:], log_r[2:] - log_r[:2])
        total = total - F.logsigmoid(50 * margin).mean()
    total.backward()
    expected = torch.cat([p.grad.flatten() for p in params])
    assert expected.abs().max() > 0
    assert_same_gradients([got], [expected])            # the same calls, summed over the steps in another order


def test_online_needs_a_stochastic_step(tmp_path):
    from diffrl.errors import UserInputError

    with pytest.raises(UserInputError, match="sample.num_steps >= 2"):
        _run(tmp_path, "sample.scheduler=euler_ancestral", "sample.num_steps=1", "sample.guidance_scale=0")
    with pytest.raises(UserInputError, match="pso.mode=offline"):
        _run(tmp_path, *TURBO, "pso.dataset=assets/datasets/shapes")


def test_offline_losers_come_from_the_initial_student_and_are_cached(tmp_path):
    """The reference images are sampled with the adapters off (the frozen initial student), whatever the current
    LoRA weights are, once per run: a rebuilt trainer reads them back instead of sampling again."""
    run = _run(tmp_path, *TURBO, *OFFLINE)
    perturb_lora(run.pipe.unet, scale=0.5)       # a trained student must not change its references
    run.trainer.step(["unused", "unused"])
    cached = run.trainer.reference_latents
    with run.sampler.base_model(), torch.no_grad():
        from diffrl.trainers.pairs import generate_latents, record_seed

        expected = generate_latents(run.sampler, run.trainer.dataset.prompts, [record_seed(0, 0, i) for i in range(16)],
                                    8)
    torch.testing.assert_close(cached, expected, rtol=0, atol=1e-6)
    rebuilt = _run(tmp_path, *TURBO, *OFFLINE)
    rebuilt.sampler.sample = None                 # sampling again would fail
    torch.testing.assert_close(rebuilt.trainer._initial_student_latents(), cached, rtol=0, atol=0)
    assert run.trainer.dataset.latents.shape == cached.shape == (16, 4, 16, 16)


@pytest.mark.parametrize("mode", [[], OFFLINE], ids=["online", "offline"])
def test_resume_continues_exactly(tmp_path, mode):
    state_a, state_b = straight_and_resumed_states(_config, tmp_path, *LCM, *mode)
    assert state_a["steps_done"] == state_b["steps_done"] == 4
    assert torch.equal(state_a["generator"], state_b["generator"])


@torch.no_grad()
def _held_out_pair_margins(run, trajectories, winner_first):
    """[pairs] mean over stochastic steps of log r(winner) − log r(loser), r = p_θ / p_initial, unclamped."""
    sampler, n = run.sampler, len(winner_first)
    margins = []
    for s in sampler.stochastic_steps:
        args = (trajectories.latents[:, s], trajectories.latents[:, s + 1], s, trajectories.prompt_embeds,
                trajectories.negative_prompt_embeds)
        log_r = sampler.transition_log_prob(*args)[0] - sampler.transition_log_prob(*args, reference=True)[0]
        margins.append(torch.where(winner_first, log_r[:n] - log_r[n:], log_r[n:] - log_r[:n]))
    return torch.stack(margins).mean(0)


@pytest.mark.slow
def test_online_learning_prefers_the_rewarded_sample_of_new_pairs(tmp_path):
    """16 pairs sampled from the initial student before training, ranked by brightness: after 20 online steps
    the student's likelihood ratio favours the brighter member. Measured: mean margin 4.7e-4 with 10 of 16 pairs
    right; trained on the negated reward the same pairs get −3.4e-4, so a sign error in the pairing fails. The
    fixed-seed brightness itself moves within noise on this toy model (±0.005 for either sign), the PSO clamp
    keeping the student within ±10 % per-step likelihood of its initial copy. Few-step sampling still works."""
    torch.set_num_threads(2)
    run = _run(tmp_path, *LCM, "sample.batch_size=8", "train.learning_rate=1.0e-3")
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow star"] * 4
    with torch.no_grad():
        pairs = run.sampler.sample(prompts * 2, generator=torch.Generator().manual_seed(7))
        rewards = run.reward(pairs.images, pairs.prompts).float()
    for step in range(20):
        run.trainer.step(prompts_for_step(run.prompts, step, 8, seed=0))
    margins = _held_out_pair_margins(run, pairs, rewards[:16] > rewards[16:])
    assert margins.mean() > 1.5e-4 and (margins > 0).sum() >= 9, margins
    with torch.no_grad():
        images = run.sampler.sample(["a red circle"] * 4).images
    assert torch.isfinite(images).all() and images.std() > 0.02


@pytest.mark.slow
def test_offline_learning_prefers_the_dataset_images(tmp_path):
    """After 20 offline steps the student denoises dataset images better, relative to the initial student, than the
    initial student's own samples, on noise it never trained on (a flipped sign drives the margin negative)."""
    torch.set_num_threads(2)
    run = _run(tmp_path, *LCM, *OFFLINE, "pso.dataset_limit=32", "sample.batch_size=8", "train.learning_rate=1.0e-3",
               "pso.beta=2000")
    for step in range(20):
        run.trainer.step([""] * 8)
    records = list(range(len(run.trainer.dataset.prompts)))
    margins = implicit_margins(run, records, run.trainer.reference_latents, timesteps=run.trainer.grid, reference=None)
    assert margins.mean() > 2e-3 and (margins > 0).float().mean() > 0.8, margins
