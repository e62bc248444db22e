"""DRaFT: refusals, AlignProp's truncation draws, DRaFT-LV and DRaFT+ terms, and a learning test."""

from __future__ import annotations

import pytest
import torch

from diffrl.errors import UserInputError
from diffrl.trainers.draft import DraftConfig
from diffrl.training import build_run, prompts_for_step
from tests.conftest import perturb_lora
from tests.fixtures import fast_config, lora_state


def _run(tmp_path, *overrides):
    return build_run(fast_config(*overrides), tmp_path)


def test_refuses_non_differentiable_reward(tmp_path):
    with pytest.raises(UserInputError, match="not differentiable"):
        _run(tmp_path, "reward=compressibility")


@pytest.mark.parametrize("overrides, message", [
    (["draft.k=5"], "draft.k"),
    (["draft.lv_samples=2", "draft.k=2"], "lv_samples"),
])
def test_refuses_inconsistent_settings(tmp_path, overrides, message):
    with pytest.raises(UserInputError, match=message):
        _run(tmp_path, *overrides)


def _alignprop_gaussian_k(mean: float, std: float, steps: int = 50) -> dict[int, float]:
    """P(K = k) of AlignProp's rule written out: b = int(x), x ~ N(mean, std), redrawn until 1 ≤ b ≤ steps − 1, so
    b = steps − k has x ∈ [b, b + 1) and the accepted mass is x ∈ [1, steps)."""
    cdf = torch.distributions.Normal(mean, std).cdf
    accepted = float(cdf(torch.tensor(float(steps))) - cdf(torch.tensor(1.0)))
    return {k: float(cdf(torch.tensor(steps - k + 1.0)) - cdf(torch.tensor(float(steps - k)))) / accepted
            for k in range(1, steps)}


def test_truncation_draws_follow_alignprop(tmp_path):
    """AlignProp's gaussian(42, 5) on 50 steps: E[K] = 9.09 and P(K = 1) = 2.75 % (the earlier round-and-clamp rule
    gave 8.2 and 9.7 %); its uniform randint(0, 50) with the same redraw gives K uniform on 1..49. Tolerances are
    5 standard errors of the draw count (deterministic: the trainer's generator is seeded)."""
    run = _run(tmp_path, "sample.num_steps=50")
    trainer = run.trainer
    assert trainer.num_grad_steps() == 1
    trainer.config = DraftConfig(truncation="gaussian")
    draws = torch.tensor([float(trainer.num_grad_steps()) for _ in range(20000)])
    law = _alignprop_gaussian_k(42.0, 5.0)
    mean = sum(k * p for k, p in law.items())
    std = sum((k - mean) ** 2 * p for k, p in law.items()) ** 0.5
    assert abs(mean - 9.09) < 0.01 and abs(law[1] - 0.0275) < 0.0005          # the law itself, by hand
    assert abs(draws.mean().item() - mean) < 5 * std / 20000 ** 0.5
    share_of_one = (draws == 1).float().mean().item()
    assert abs(share_of_one - law[1]) < 5 * (law[1] * (1 - law[1]) / 20000) ** 0.5
    assert draws.min() >= 1 and draws.max() <= 49
    trainer.config = DraftConfig(truncation="uniform")
    draws = torch.tensor([float(trainer.num_grad_steps()) for _ in range(5000)])
    assert set(draws.long().tolist()) == set(range(1, 50))
    assert abs(draws.mean().item() - 25.0) < 5 * (48 * 50 / 12) ** 0.5 / 5000 ** 0.5   # var of U{1..49}: (49²−1)/12


def test_truncation_on_other_step_counts_rescales_and_refuses_impossible_settings(tmp_path):
    trainer = _run(tmp_path, "sample.num_steps=10", "draft.truncation=gaussian").trainer
    draws = {trainer.num_grad_steps() for _ in range(2000)}
    assert draws <= set(range(1, 10)) and {1, 2} <= draws              # b = ⌊int(x) · 10 / 50⌋ in [1, 9]
    with pytest.raises(UserInputError, match="almost never draws"):
        _run(tmp_path / "one", "sample.num_steps=1", "draft.truncation=uniform")
    with pytest.raises(UserInputError, match="almost never draws"):
        _run(tmp_path / "late", "draft.truncation=uniform", "draft.truncation_min=50", "draft.truncation_max=60")


def test_draft_plus_kl_is_zero_at_the_base_model_and_positive_after(tmp_path):
    run = _run(tmp_path, "draft.kl_coeff=1.0", "draft.k=2")
    prompts = ["a red circle"] * 2
    traj = run.sampler.sample(prompts, grad_last_k=2)
    assert run.trainer._eps_kl(traj, 2).item() == 0.0      # LoRA up-projections start at zero
    perturb_lora(run.pipe.unet)
    traj = run.sampler.sample(prompts, grad_last_k=2)
    kl = run.trainer._eps_kl(traj, 2)
    kl.backward()
    assert kl.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in run.state.optimizer.param_groups[0]["params"])


def test_lv_loss_is_minus_n_times_the_mean_reward_of_renoised_copies(tmp_path):
    """DRaFT-LV written out by hand: x0 from a no-grad trajectory, n = 3 copies re-noised to the last timestep,
    x = √ᾱ x0 + √(1−ᾱ) ε, one DDIM η = 0 step each (separate UNet calls, where the trainer batches them), decoded
    and scored: loss = −n · mean r. The rewards of the batched and separate calls differ by float32 rounding,
    ~1e-7 on a brightness of ~0.5; 1e-5 is 100× that, while a wrong ᾱ, step or factor n moves the loss by > 1e-3."""
    run = _run(tmp_path, "draft.lv_samples=3")
    perturb_lora(run.pipe.unet)
    sampler, prompts, n = run.sampler, ["a red circle", "a blue square"], 3
    generator_state = run.trainer.generator.get_state()
    torch.manual_seed(5)                                  # the trajectory's initial noise (the global RNG)
    with torch.no_grad():
        traj = sampler.sample(prompts)
        noise = torch.randn((n * 2, *traj.latents.shape[2:]), generator=torch.Generator().set_state(generator_state))
        last = sampler.num_steps - 1
        alpha, alpha_next = sampler.kernel.alphas[last], sampler.kernel.alphas_prev[last]
        rewards = []
        for copy in noise.split(2):
            x = alpha.sqrt() * traj.latents[:, -1] + (1 - alpha).sqrt() * copy
            eps = sampler.predict_noise(x, sampler.timesteps[last], traj.conditioning,
                                        negative_prompt_embeds=traj.negative_conditioning)
            x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
            x_next = alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * eps
            rewards.append(run.reward(sampler.decode(x_next), prompts))
    expected = -n * torch.cat(rewards).mean().item()
    torch.manual_seed(5)
    metrics = run.trainer.step(prompts)
    assert metrics["loss"] == pytest.approx(expected, abs=1e-5)
    assert metrics["reward_mean"] == pytest.approx(-expected / n, abs=1e-5) and metrics["k"] == 1.0


def test_metrics_of_one_step(tmp_path):
    metrics = _run(tmp_path, "draft.kl_coeff=0.1").trainer.step(["a red circle"] * 4)
    assert {"loss", "reward_mean", "reward_std", "k", "reward/brightness", "kl", "grad_norm"} <= metrics.keys()
    assert all(isinstance(value, float) for value in metrics.values())


@pytest.mark.parametrize("variant", [[], ["draft.lv_samples=2"]])
def test_learning_raises_brightness(tmp_path, variant):
    """A sign error lowers brightness and a detached graph leaves it (and the LoRA) unchanged."""
    torch.set_num_threads(2)
    run = _run(tmp_path, "train.learning_rate=1.0e-2", *variant)
    fixed = run.sampler.initial_latents(8, torch.Generator().manual_seed(123))

    def brightness() -> float:
        with torch.no_grad():
            return run.reward(run.sampler.sample(run.prompts, initial_latents=fixed).images, run.prompts).mean().item()

    before, initial_lora = brightness(), lora_state(run.pipe.unet)
    for step in range(15):
        run.trainer.step(prompts_for_step(run.prompts, step, 4, seed=0))
    after = brightness()
    changed = max((p - initial_lora[n]).abs().max().item() for n, p in lora_state(run.pipe.unet).items())
    assert changed > 1e-3
    assert after - before > 0.03, f"brightness {before:.4f} -> {after:.4f}"


def test_state_dict_round_trip(tmp_path):
    trainer = _run(tmp_path, "draft.truncation=uniform", "sample.num_steps=4").trainer
    state = trainer.state_dict()
    first = [trainer.num_grad_steps() for _ in range(5)]
    trainer.load_state_dict(state)
    assert [trainer.num_grad_steps() for _ in range(5)] == first


SHAPES_HELD_OUT = "assets/prompts/shapes-single-heldout.txt"


def test_draft_on_shapesworld_raises_exact_accuracy_on_held_out_prompts(tmp_path):
    """The README's demo, shortened: DRaFT-3 on the soft ShapesWorld score raises the *exact* scorer's accuracy on
    prompts it never trained on (each colour and shape seen in training, never these pairs)."""
    from diffrl.config import load_config
    from rewards.shapes import ShapesAccuracyReward

    run = build_run(load_config("assets/configs/shapes-draft.yaml", []), tmp_path)
    held_out = [line for line in open(SHAPES_HELD_OUT).read().splitlines() if line] * 8

    def held_out_accuracy() -> float:
        with torch.no_grad():
            traj = run.sampler.sample(held_out, generator=torch.Generator().manual_seed(7))
        return float(ShapesAccuracyReward()(traj.images, held_out).mean())

    before = held_out_accuracy()
    for step in range(30):
        run.trainer.step(prompts_for_step(run.prompts, step, run.config.sample.batch_size, seed=0))
    after = held_out_accuracy()
    print(f"ShapesWorld DRaFT-3, 30 steps: held-out exact accuracy {before:.3f} -> {after:.3f}")
    # Measured 0.312 -> 0.479 on these 48 samples (+0.17); with the reward's sign flipped, 0.312 -> 0.285.
    assert after >= before + 0.08
