"""DiffusionNFT: the loss on a hand-worked example, its gradient where θ = θ_old, the x0-parameterisation on diffusion
models, the θ_old schedule and adapter, two steps on every family, refusals, exact resume and a learning test."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from diffrl.errors import UserInputError
from diffrl.lora import add_lora
from diffrl.models import build_tiny_pipeline
from diffrl.trainers.nft import (NftConfig, NftTrainer, OldPolicy, implicit_policies, nft_policy_loss, old_policy_decay,
                                 optimality_probability)
from diffrl.training import build_run, prompts_for_step, train
from diffrl.transitions.process import RectifiedFlow, VariancePreserving
from tests.fixtures import fast_config, learning_run

# float32's unit roundoff: a sum of two rounded products is within 3u of the exact value relative to its terms.
U32 = 2.0**-24
# 2 prompts × G = 2 samples, 3 sampling steps of which K = ⌊3 · 0.99⌋ = 2 are trained: the least that exercises groups,
# micro-batches and several timesteps per sample
SMALL = ["trainer=nft", "nft.group_size=2", "sample.batch_size=2", "sample.num_steps=3"]


# -- the loss, worked by hand ------------------------------------------------------------------------------------------

class ScriptedSampler:
    """Stands in for SDSampler in NftTrainer.slot_loss: the rectified-flow process of a 1000-step scheduler and fixed
    velocities for θ (a leaf with grad), θ_old (inside old_policy.active()) and the reference model."""

    dtype = torch.float32

    def __init__(self, theta, old, reference):
        self.process = RectifiedFlow(SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000)))
        self.theta, self.old, self.reference = theta, old, reference
        self.old_active, self.inputs = False, []

    def add_training_noise(self, x0, noise, t):
        return self.process.add_noise(x0, noise, t)

    def training_x0(self, prediction, latents, t):
        return self.process.x0_from_training_prediction(prediction, latents, t)

    def predict_training_target(self, latents, t, conditioning, *, reference=False):
        self.inputs.append(latents)
        return self.reference if reference else self.old if self.old_active else self.theta

    @contextlib.contextmanager
    def active(self):   # the old policy's switch
        self.old_active = True
        yield
        self.old_active = False


def scripted_trainer(theta, old, reference, **config) -> NftTrainer:
    trainer = NftTrainer.__new__(NftTrainer)   # slot_loss needs only its config, sampler and old policy
    trainer.config, trainer.sampler = NftConfig(**config), ScriptedSampler(theta, old, reference)
    trainer.old_policy = trainer.sampler
    return trainer


def test_loss_of_two_samples_worked_by_hand():
    """Two samples of two latent elements, β = 0.5, c = 5, KL weight 0.1; written as the official code computes it,
    in velocity space (x̂0^± = x_t − σ v^±), where the trainer combines x̂0_θ and x̂0_old.

    sample 1: x0 = (1, 0), ε = (0, 2), σ = 0.5: x_t = (0.5, 1); v_θ = (1, −1), v_old = (0, −2), Â = 1 → r = 0.6
        v⁺ = 0.5 v_θ + 0.5 v_old = (0.5, −1.5)    x̂0⁺ = (0.25, 1.75)   e⁺ = (−0.75, 1.75)  w = 1.25
        L⁺ = mean(e²)/w = (0.5625 + 3.0625)/2/1.25 = 1.45
        v⁻ = 1.5 v_old − 0.5 v_θ = (−0.5, −2.5)   x̂0⁻ = (0.75, 2.25)   e⁻ = (−0.25, 2.25)  w = 1.25
        L⁻ = (0.0625 + 5.0625)/2/1.25 = 2.05
        c (r L⁺ + (1 − r) L⁻)/β = 10 (0.87 + 0.82) = 16.9
    sample 2: x0 = (0, 2), ε = (1, −1), σ = 0.25: x_t = (0.25, 1.25); v_θ = (2, 0), v_old = (2, 2), Â = −7 → −5 → r = 0
        v⁻ = (2, 3)   x̂0⁻ = (−0.25, 0.5)   e⁻ = (−0.25, −1.5)   w = 0.875   L⁻ = (0.0625 + 2.25)/2/0.875 = 1.3214286
        c (1 − r) L⁻/β = 13.214286
    policy loss = (16.9 + 13.214286)/2 = 15.057143
    v_ref = (0, 0), (2, 1): mean((v_θ − v_ref)²) = (1 + 1 + 0 + 1)/4 = 0.75; loss = 15.057143 + 0.1 · 0.75 = 15.132143
    """
    theta = torch.tensor([[1.0, -1.0], [2.0, 0.0]], requires_grad=True)
    trainer = scripted_trainer(theta, torch.tensor([[0.0, -2.0], [2.0, 2.0]]), torch.tensor([[0.0, 0.0], [2.0, 1.0]]),
                               beta=0.5, adv_clip_max=5.0, kl_weight=0.1)
    optimality = optimality_probability(torch.tensor([1.0, -7.0]), 5.0)
    assert optimality.tolist() == pytest.approx([0.6, 0.0], abs=1e-7)
    loss, parts = trainer.slot_loss(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), None, optimality,
                                    torch.tensor([500.0, 250.0]), torch.tensor([[0.0, 2.0], [1.0, -1.0]]))
    assert all(x.tolist() == [[0.5, 1.0], [0.25, 1.25]] for x in trainer.sampler.inputs)   # x_t, exact in binary
    # each value is a few float32 operations on O(10) numbers: relative error ≲ 20u ≈ 1e-6
    assert parts["policy_loss"].item() == pytest.approx(15.057142857, rel=1e-5)
    assert parts["kl"].item() == pytest.approx(0.75, rel=1e-6)
    assert loss.item() == pytest.approx(15.132142857, rel=1e-5)


def test_optimality_probability_maps_clipped_advantages_to_the_unit_interval():
    advantages = torch.tensor([0.0, 2.5, -2.5, 5.0, -5.0, 12.0, -1e9])
    assert optimality_probability(advantages, 5.0).tolist() == pytest.approx([0.5, 0.75, 0.25, 1.0, 0.0, 1.0, 0.0])


def test_at_theta_equal_old_both_implicit_policies_are_the_old_one():
    """β v + (1 − β) v and (1 + β) v − β v: two rounded products and a rounded sum, within 3u of v."""
    old = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for beta in (1.0, 0.3, 0.1):
        positive, negative = implicit_policies(old.clone(), old, beta)
        for implicit in (positive, negative):
            assert ((implicit - old).abs() <= 3 * U32 * (1 + 2 * beta) * old.abs()).all()


def test_gradient_at_theta_equal_old_is_the_advantage_weighted_regression_gradient():
    """At θ = θ_old the two implicit errors coincide, e = x̂0 − x0 with w = mean|e|, and
    ∂/∂x̂0_θ of mean_b c (r L⁺ + (1 − r) L⁻)/β = c (2r − 1) · 2e/(w D B) = clip(Â) · 2e/(w D B):
    a positive advantage pulls x̂0_θ towards the sample, a negative one pushes it away, whatever β."""
    generator = torch.Generator().manual_seed(1)
    x0, x0_old = torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 2, 4, 4, generator=generator)
    advantages = torch.tensor([1.5, -0.5, 9.0])
    for beta in (1.0, 0.1):
        x0_theta = x0_old.clone().requires_grad_(True)
        loss = nft_policy_loss(x0_theta, x0_old, x0, optimality_probability(advantages, 5.0), beta, 5.0).mean()
        (gradient,) = torch.autograd.grad(loss, x0_theta)
        error = x0_old - x0
        weight = error.abs().mean(dim=(1, 2, 3), keepdim=True)
        expected = advantages.clamp(-5, 5).view(-1, 1, 1, 1) * 2 * error / (weight * 32 * 3)
        # float32 sums over D = 32 elements and products of O(1) factors: ≲ 1e-6 relative, 1e-5 allows any kernel
        torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)


def test_x0_parameterisation_carries_the_implicit_policies_over_to_epsilon_prediction():
    """x̂0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ is affine in ε̂ with weights of the combination summing to 1, so x̂0 of the combined
    predictions is the same combination of x̂0_θ and x̂0_old (in float64: equal to ~1e-15 relative)."""
    alphas = torch.linspace(0.9991, 0.0047, 1000, dtype=torch.float64)
    process = VariancePreserving(SimpleNamespace(alphas_cumprod=alphas, config=SimpleNamespace(
        prediction_type="epsilon")))
    generator = torch.Generator().manual_seed(2)
    x_t, eps_theta, eps_old = (torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([981, 21])
    for beta in (1.0, 0.1):
        from_predictions = [process.x0_from_training_prediction(e, x_t, t)
                            for e in implicit_policies(eps_theta, eps_old, beta)]
        from_x0 = implicit_policies(process.x0_from_training_prediction(eps_theta, x_t, t),
                                    process.x0_from_training_prediction(eps_old, x_t, t), beta)
        for a, b in zip(from_predictions, from_x0):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# -- the old policy ----------------------------------------------------------------------------------------------------

def test_old_policy_decay_follows_both_official_schedules():
    """return_decay (train_nft_sd3.py lines 169-189): type 1 min(0.001 s, 0.5); type 2 0 for s < 75, then
    min(0.0075 (s − 75), 0.999)."""
    type_1 = {0: 0.0, 1: 0.001, 2: 0.002, 250: 0.25, 500: 0.5, 501: 0.5, 10_000: 0.5}
    for steps, decay in type_1.items():
        assert old_policy_decay(steps, 0.001, 0.5, 0) == pytest.approx(decay, rel=1e-12)
    type_2 = {0: 0.0, 74: 0.0, 75: 0.0, 76: 0.0075, 100: 0.1875, 208: 0.9975, 209: 0.999, 10_000: 0.999}
    for steps, decay in type_2.items():
        assert old_policy_decay(steps, 0.0075, 0.999, 75) == pytest.approx(decay, rel=1e-12)


def test_old_policy_is_a_second_adapter_that_follows_theta_by_the_ema():
    unet = build_tiny_pipeline().unet
    trained = add_lora(unet, rank=4)
    with torch.no_grad():
        for param in trained:
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    old_policy = OldPolicy(unet)
    assert unet.active_adapters() == ["default"] and all(p.requires_grad for p in trained)
    assert all(not old.requires_grad and old.dtype == torch.float32 for old, _ in old_policy.pairs)
    assert all(torch.equal(old, theta) for old, theta in old_policy.pairs)   # θ_old starts as θ, exactly
    before = [old.clone() for old, _ in old_policy.pairs]
    with torch.no_grad():
        for param in trained:
            param.mul_(-2.0)
    old_policy.blend(0.25)
    for (old, theta), previous in zip(old_policy.pairs, before):   # θ_old ← 0.25 θ_old + 0.75 θ, by hand
        expected = 0.25 * previous + 0.75 * theta
        assert ((old - expected).abs() <= 3 * U32 * (0.25 * previous.abs() + 0.75 * theta.abs())).all()
    # inside active() the network computes with θ_old's weights: the same as θ set to θ_old's values
    inputs = (torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4)), torch.tensor([500]),
              torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(5)))
    with torch.no_grad(), old_policy.active():
        assert unet.active_adapters() == ["old"]
        with_old = unet(*inputs).sample
    assert unet.active_adapters() == ["default"] and all(p.requires_grad for p in trained)
    with torch.no_grad():
        for old, theta in old_policy.pairs:
            theta.copy_(old)
        assert torch.equal(unet(*inputs).sample, with_old)


# -- the trainer on every family ---------------------------------------------------------------------------------------

def trained_weights(network) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in network.named_parameters() if ".default." in name}


FAMILIES = {"tiny-sd3": [], "tiny-flux": [], "tiny-zimage": [],
            # the SD UNet (ε-prediction, x0-parameterisation) with a black-box multistep solver: DPM-Solver++(2M)
            "tiny": ["sample.scheduler=DPMSolverMultistepScheduler"]}


@pytest.mark.parametrize("model", list(FAMILIES))
def test_two_steps_on_every_family(model, tmp_path):
    """Finite metrics, a moved LoRA, rollouts by θ_old, and θ_old ← d θ_old + (1 − d) θ after each step, d = 0.001 s
    (the official default schedule, one optimiser step per trainer step)."""
    run = build_run(fast_config(f"model={model}", *SMALL, *FAMILIES[model]), tmp_path)
    trainer, network = run.trainer, run.sampler.network
    rollout_adapters, sample = [], run.sampler.sample
    run.sampler.sample = lambda prompts, **kwargs: rollout_adapters.append(network.active_adapters()) or sample(
        prompts, **kwargs)
    initial = trained_weights(network)
    for step in range(2):
        old_before = {name: value.clone() for name, value in trainer.old_policy.state_dict().items()}
        metrics = trainer.step(prompts_for_step(run.prompts, step, run.config.sample.batch_size, seed=0))
        assert all(math.isfinite(value) for value in metrics.values()), metrics
        decay = metrics["old_decay"]
        assert decay == pytest.approx(0.001 * (step + 1)) and trainer.optimizer_steps == step + 1
        theta = trained_weights(network)
        for name, old in trainer.old_policy.state_dict().items():
            previous, current = old_before[name], theta[name.replace(".old.", ".default.")]
            bound = 3 * U32 * (decay * previous.abs() + (1 - decay) * current.abs())
            assert ((old - (decay * previous + (1 - decay) * current)).abs() <= bound).all(), name
    assert rollout_adapters == [["old"], ["old"]]
    assert network.active_adapters() == ["default"]
    assert max((p - initial[n]).abs().max().item() for n, p in trained_weights(network).items()) > 0


def test_cfg_free_rollouts_and_the_guidance_kept_for_grids(tmp_path, capsys):
    run = build_run(fast_config("model=tiny-sd3", *SMALL, "sample.guidance_scale=4.5"), tmp_path)
    assert "nft rolls out without CFG" in capsys.readouterr().err
    traj_negatives, sample = [], run.sampler.sample
    run.sampler.sample = lambda prompts, **kwargs: traj_negatives.append(run.sampler.do_cfg) or sample(prompts, **kwargs)
    run.trainer.step(prompts_for_step(run.prompts, 0, 2, seed=0))
    assert traj_negatives == [False] and run.sampler.guidance_scale == 4.5


@pytest.mark.parametrize("overrides, message", [
    (["model=tiny", "sample.scheduler=euler_ancestral"], "sample.scheduler=euler_ancestral marks this run as one"),
    (["model=tiny", "sample.scheduler=lcm"], "sample.scheduler=lcm marks this run as one"),
    (["model=tiny", "sample.schedule=trailing"], "sample.schedule=trailing marks this run as one"),
    (["nft.group_size=1"], "nft.group_size must be at least 2"),
    (["nft.train_batch_size=3"], "must be a multiple of nft.train_batch_size (3)"),
    (["nft.old_decay_max=1.0"], "nft.old_decay_max"),
])
def test_refusals(overrides, message, tmp_path):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config = fast_config("model=tiny-sd3", *SMALL, *overrides)
        NftTrainer.optimizer_steps_per_step(config)
        build_run(config, tmp_path)


def test_flow_students_are_refused_by_their_model_id(tmp_path, monkeypatch):
    """FLUX.1-schnell and Z-Image-Turbo sample with the flow ODE like their base models: their hub id tells them."""
    from diffusers import StableDiffusion3Pipeline

    monkeypatch.setattr(StableDiffusion3Pipeline, "name_or_path", property(lambda self: "Tongyi-MAI/Z-Image-Turbo"),
                        raising=False)
    with pytest.raises(UserInputError, match="model 'Tongyi-MAI/Z-Image-Turbo' marks this run as one"):
        build_run(fast_config("model=tiny-sd3", *SMALL), tmp_path)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    """2 steps, then resume for a 3rd: the same LoRA, θ_old, optimiser-step count and generator as 3 straight steps."""
    def config(steps):
        return fast_config("model=tiny-sd3", *SMALL, f"train.steps={steps}", "train.learning_rate=1.0e-3",
                           "log.checkpoint_every=2", "log.grid_every=100", "log.grid_prompts=1", "log.grid_seeds=[0]")
    train(config(3), tmp_path / "straight", quiet=True)
    train(config(2), tmp_path / "resumed", quiet=True)
    train(config(3), tmp_path / "resumed", quiet=True, resume=True)
    final = "checkpoints/step-000003"
    a, b = (load_file(tmp_path / run / final / "pytorch_lora_weights.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a, state_b = (torch.load(tmp_path / run / final / "training_state" / "trainer.pt", weights_only=True)
                        for run in ("straight", "resumed"))
    assert state_a["optimizer_steps"] == state_b["optimizer_steps"] == 3
    assert torch.equal(state_a["generator"], state_b["generator"])
    assert state_a["old_policy"].keys() == state_b["old_policy"].keys()
    assert all(torch.equal(state_a["old_policy"][k], state_b["old_policy"][k]) for k in state_a["old_policy"])
    assert not any("old" in key for key in a)   # the saved LoRA file holds θ only


# -- learning ----------------------------------------------------------------------------------------------------------

LEARNING = ["model=tiny-sd3", "trainer=nft", "nft.group_size=4", "sample.batch_size=4", "sample.num_steps=6",
            "sample.guidance_scale=1.0", "train.learning_rate=3.0e-2"]
LEARNING_STEPS = 10
# 10 steps of 4 prompts × G = 4 images, 6 ODE steps of which 5 are trained, lr 3e-2; the fixed-seed reward rose by
# +0.0111 (brightness) and +0.0074 (−brightness, the sign flip) with train.seed 0, +0.0102 and +0.0050 with seed 1.
# Half the smallest leaves room for another machine's rounding, while a sign error (which moves the reward by −0.005
# to −0.011) or a frozen or detached LoRA (0) fails it.
MIN_NFT_GAIN = 0.0025


@pytest.mark.slow
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_learning_moves_brightness_the_way_the_reward_points(sign, tmp_path):
    torch.set_num_threads(2)
    run = build_run(fast_config(*LEARNING, f"reward={{brightness: {sign}}}"), tmp_path)
    before, after, change = learning_run(run, steps=LEARNING_STEPS, batch_size=run.config.sample.batch_size)
    assert change > 1e-3
    assert after - before > MIN_NFT_GAIN, f"reward (sign · brightness) {before:.4f} -> {after:.4f}"
