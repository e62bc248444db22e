"""diffrl: reward fine-tuning of text-to-image diffusion models.

    from diffrl import load_pipeline, SDSampler
    pipe = load_pipeline("tiny")                       # hub id, local folder, single file, or a built-in
    sampler = SDSampler(pipe, num_steps=50, guidance_scale=7.5, eta=1.0)
    traj = sampler.sample(["a photo of a cat"])        # latents, timesteps, log-probs, images

Names are imported on first use, so ``import diffrl`` (and the CLI's config checks) stay fast.
"""

from __future__ import annotations

import importlib

from diffrl import _torchvision_compat

_torchvision_compat.install()  # before anything imports torchvision (transformers does); imports nothing itself

__version__ = "0.1.0"

_EXPORTS = {
    "load_pipeline": "diffrl.models",
    "BUILTIN_MODELS": "diffrl.models",
    "SDSampler": "diffrl.sampler",
    "Sampler": "diffrl.sampler",
    "Trajectory": "diffrl.trajectory",
    "Config": "diffrl.config",
    "load_config": "diffrl.config",
    "train": "diffrl.training",
    "TRAINERS": "diffrl.trainers",
    "UserInputError": "diffrl.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffrl' has no attribute {name!r}")
