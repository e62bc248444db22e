"""scripts/pretrain_shapesworld.py at micro scale, and the built-in `shapes` model's loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffrl import SDSampler, load_pipeline
from diffrl import models
from diffrl.errors import UserInputError
from tests.fixtures import script_fixture



pretrain_script = script_fixture("pretrain_shapesworld", scope="module")


MICRO = ["--resolution", "32", "--vae-steps", "3", "--unet-steps", "3", "--vae-batch-size", "4",
         "--unet-batch-size", "4", "--eval-per-family", "2", "--eval-steps", "2", "--quiet"]


def test_micro_pretraining_writes_a_loadable_fp16_safetensors_pipeline(pretrain_script, tmp_path, monkeypatch):
    output = tmp_path / "shapes"
    args = pretrain_script.parse_args(MICRO + ["--output", str(output), "--state-dir", str(tmp_path / "state"),
                                               "--grid", str(tmp_path / "grid.png")])
    pretrain_script.pretrain(args)

    weights = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.suffix in
                     (".safetensors", ".bin", ".pt", ".ckpt"))
    assert weights == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                       "vae/diffusion_pytorch_model.safetensors"]
    with safe_open(output / "unet" / "diffusion_pytorch_model.safetensors", "pt") as file:
        assert file.get_tensor(next(iter(file.keys()))).dtype == torch.float16
    metrics = json.loads((output / "pretrain_metrics.json").read_text())
    assert metrics["vae"]["steps"] == 3 and metrics["unet"]["steps"] == 3
    assert set(metrics["samples"]) >= {"single", "pair", "relation", "count"}
    assert (tmp_path / "grid.png").is_file()

    monkeypatch.setattr(models, "SHAPES_MODEL_DIR", output)   # the built-in name reads the same kind of folder
    pipe = load_pipeline("shapes")
    assert pipe.vae.config.scaling_factor != 0.18215   # measured on this VAE's latents, not SD's constant
    traj = SDSampler(pipe, num_steps=2, guidance_scale=4.0, eta=0.0).sample(
        ["a red circle", "two blue squares"], generator=torch.Generator().manual_seed(0))
    assert traj.images.shape == (2, 3, 32, 32) and torch.isfinite(traj.images).all()


def test_resumed_phase_matches_an_uninterrupted_one(pretrain_script, tmp_path):
    """Stopping after 2 steps and continuing to 4 gives the weights of 4 steps in one go."""
    def vae_after(steps: int, state_dir: Path) -> dict:
        _, _, vae, _ = pretrain_script.build_models(32, seed=0)
        budget = pretrain_script.PhaseBudget(steps, None, batch_size=2, learning_rate=1e-3)
        loss = lambda step: pretrain_script.vae_loss(   # noqa: E731
            vae, pretrain_script.training_images(step, 2, 0, 32)[0], pretrain_script.step_generator(0, 0, step), 1e-4)
        pretrain_script.train_phase("vae", vae, loss, budget, state_dir, quiet=True)
        return vae.state_dict()

    vae_after(2, tmp_path / "interrupted")
    resumed = vae_after(4, tmp_path / "interrupted")
    uninterrupted = vae_after(4, tmp_path / "straight")
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)


def test_shapes_builtin_without_its_folder_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "SHAPES_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(UserInputError, match=r"python3 scripts/pretrain_shapesworld\.py"):
        load_pipeline("shapes")


def test_the_shipped_shapes_model_loads_offline_and_draws_what_it_is_asked(monkeypatch):
    """assets/models/shapes: within the size budget, and its samples pass the exact scorer far above chance."""
    from rewards.shapes import ShapesAccuracyReward

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    size = sum(path.stat().st_size for path in models.SHAPES_MODEL_DIR.rglob("*") if path.is_file())
    assert size <= 10 * 2 ** 20
    pipe = load_pipeline("shapes")
    prompts = [line for line in Path("assets/prompts/shapes-single-train.txt").read_text().splitlines() if line]
    with torch.no_grad():
        traj = SDSampler(pipe, num_steps=10, guidance_scale=4.0, eta=0.0).sample(
            prompts, generator=torch.Generator().manual_seed(0))
    accuracy = float(ShapesAccuracyReward()(traj.images, prompts).mean())
    # Measured 0.40 (README); a model of noise, or one blind to its prompt, passes few colour checks of 6 colours.
    assert accuracy >= 0.25, accuracy
