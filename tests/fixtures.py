"""Small helpers shared by the trainer and loop tests: short configs and a reward that turns NaN."""

from __future__ import annotations

import torch

from diffrl.config import load_config

FAST = ["sample.num_steps=4", "sample.guidance_scale=4.0", "sample.batch_size=4", "reward=brightness",
        "prompts=assets/prompts/simple.txt", "log.grid_prompts=2", "log.grid_seeds=[0, 1]"]


def fast_config(*overrides: str):
    return load_config(None, [*FAST, *overrides])


def lora_state(unet) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in unet.named_parameters() if "lora_" in name}


class NanRewardBase(torch.nn.Module):
    """Brightness, NaN on the calls in `nan_calls` (1-based): a reward model that blows up mid-run."""

    differentiable = True
    nan_calls: range = range(0)

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images, prompts):
        self.calls += 1
        brightness = images.mean(dim=(1, 2, 3))
        return brightness * float("nan") if self.calls in self.nan_calls else brightness


class NanAfterTwoCalls(NanRewardBase):
    """Brightness for two calls, then NaN for good."""

    nan_calls = range(3, 1 << 30)


class HostBrightness:
    """Mean pixel value computed in NumPy on the host: a reward with no gradient path, like a black-box scorer."""

    differentiable = False

    def __call__(self, images, prompts):
        values = images.detach().float().cpu().numpy().mean(axis=(1, 2, 3))
        return torch.from_numpy(values).to(images.device)


def fixed_seed_reward(run, prompts=("a red circle", "a blue square"), copies: int = 4, seed: int = 123) -> float:
    """The run's reward on fixed prompts and sampling noise: before/after differences show the policy's change."""
    with torch.no_grad():
        traj = run.sampler.sample(list(prompts) * copies, generator=torch.Generator().manual_seed(seed))
        return float(run.reward(traj.images, traj.prompts).float().mean())


def learning_run(run, steps: int, batch_size: int) -> tuple[float, float, float]:
    """(fixed-seed reward before, after, largest LoRA change) over `steps` trainer steps of a run."""
    from diffrl.training import prompts_for_step

    before, initial = fixed_seed_reward(run), lora_state(run.sampler.network)
    for step in range(steps):
        run.trainer.step(prompts_for_step(run.prompts, step, batch_size, seed=0))
    change = max((p - initial[n]).abs().max().item() for n, p in lora_state(run.sampler.network).items())
    return before, fixed_seed_reward(run), change


def straight_and_resumed_states(make_config, tmp_path, *overrides: str) -> tuple[dict, dict]:
    """Train 4 steps straight and 2 + resume to 4; assert equal LoRA weights; return both final trainer states."""
    from safetensors.torch import load_file

    from diffrl.training import train

    overrides = ["log.checkpoint_every=2", "log.grid_every=100", "train.learning_rate=1.0e-3", *overrides]
    train(make_config("train.steps=4", *overrides), tmp_path / "straight", quiet=True)
    train(make_config("train.steps=2", *overrides), tmp_path / "resumed", quiet=True)
    train(make_config("train.steps=4", *overrides), tmp_path / "resumed", quiet=True, resume=True)
    final = "checkpoints/step-000004"
    a, b = (load_file(tmp_path / run / final / "pytorch_lora_weights.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return tuple(torch.load(tmp_path / run / final / "training_state" / "trainer.pt", weights_only=True)
                 for run in ("straight", "resumed"))


def load_script(name: str):
    """A file of scripts/ imported as a module (scripts are not a package), registered in sys.modules while in use
    because dataclasses look their module up there; the caller removes it with `del sys.modules[module.__name__]`
    (script_fixture does both)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"diffrl_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def script_fixture(name: str, scope: str = "function"):
    """A pytest fixture giving scripts/<name>.py as a module, unregistered again afterwards."""
    import sys

    import pytest

    @pytest.fixture(scope=scope)
    def script():
        module = load_script(name)
        yield module
        del sys.modules[module.__name__]

    return script


# Two float32 computations of the same gradient that differ only in summation order (batch 4 at once vs. 2 + 2
# accumulated: other batch shapes, other kernel blocking) agree per tensor to about u·√n relative to the tensor's
# norm, u = 6e-8 (float32 unit roundoff), n ≲ 1e4 products summed per element: ~1e-5. 1e-4 leaves room for any
# machine of this kind, while a lost 1/accumulation scaling is a relative error of 1, a dropped micro-batch ~0.5.
# Element-wise tolerances are wrong here: elements where per-sample gradients cancel are near zero and carry the
# whole tensor's rounding error.
SAME_GRADIENT_RTOL = 1e-4


def assert_same_gradients(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Per tensor, ‖got − expected‖ ≤ SAME_GRADIENT_RTOL · ‖expected‖ (exactly equal where expected is 0)."""
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        difference, scale = (a.double() - b.double()).norm().item(), b.double().norm().item()
        assert difference <= SAME_GRADIENT_RTOL * scale, f"tensor {index}: |diff| {difference:.3g} vs |expected| {scale:.3g}"


# ρ − 1 before an update, when rows are recomputed in another batch composition (DPOK's buffer rows, per-row
# timesteps): the UNet's float32 output moves by a few ulps, and log p (a mean of O(1) terms) by about one ulp of
# an O(1) number, 1.2e-7 (measured: at most 1.2e-7 on the tiny model). 1e-5 leaves ~100× for other CPUs' kernels
# and is 10× below the PPO clip range 1e-4, where a real off-policy start would show; the bugs it guards give NaN
# (a σ = 0 step) or 0.16 (a bf16 sampling mean).
RECOMPUTE_ATOL = 1e-5


def check_lora_round_trip(family, build_plain, latents, t, conditioning, directory, rank: int = 4, alpha: int = 8):
    """A family's saved LoRA (rank 4, alpha 8: scale 2), loaded by a fresh pipeline's own ``load_lora_weights``, gives
    the trained denoiser's output (a loader assuming alpha = rank would be 2x off), the file holds the component's
    keys with alpha in its metadata, and ``load_lora`` restores the adapter bit for bit."""
    import json

    from safetensors import safe_open

    from diffrl.families import family_of
    from diffrl.lora import LORA_WEIGHTS_NAME

    with torch.no_grad():
        trained = family.denoise(family.denoiser, latents, t, conditioning)
    path = family.save_lora(directory)
    assert path == directory / LORA_WEIGHTS_NAME
    plain = build_plain()
    plain_denoiser = family_of(plain).denoiser
    with torch.no_grad():
        base = family.denoise(plain_denoiser, latents, t, conditioning)
    plain.load_lora_weights(directory)
    with torch.no_grad():
        loaded = family.denoise(plain_denoiser, latents, t, conditioning)
    # Both denoisers run peft's LoRA layers on the same float32 weights, so today the outputs agree bit for bit. The
    # bound leaves room for a loader that scales by alpha/rank at another point of the sum: reordered float32 products
    # differ by a few ulps (~1e-7 of the output's magnitude) per layer, and 1e-5 of the largest output, ~100 ulps,
    # covers those through the layers yet is 1000x below the adapter's effect checked next.
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5 * trained.abs().max().item())
    assert (trained - base).abs().max() > 1e-2 * trained.abs().max()   # the adapter really changes the output
    component = family.lora_component
    with safe_open(str(path), "pt") as handle:
        assert all(key.startswith(f"{component}.") for key in handle.keys())
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata[f"{component}.lora_alpha"] == alpha and metadata[f"{component}.r"] == rank

    fresh = family_of(build_plain())
    fresh.add_lora(rank=rank, alpha=alpha, target_modules=fresh.lora_target_modules)
    fresh.load_lora(directory)
    saved = {n: p for n, p in family.denoiser.named_parameters() if "lora_" in n}
    resumed = {n: p for n, p in fresh.denoiser.named_parameters() if "lora_" in n}
    assert saved.keys() == resumed.keys() and all(torch.equal(saved[n], resumed[n]) for n in saved)
