"""Shared fixtures: tiny Stable-Diffusion-architecture pipelines built from configs (no downloads, < 1 s)."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffrl  # noqa: E402,F401  first: installs the torchvision fix before any library can import torchvision
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402

from diffrl.models import build_tiny_pipeline  # noqa: E402

PROMPTS = ["a red circle", "a photo of a cat"]


@pytest.fixture(autouse=True)
def restore_thread_count():
    """Learning tests pin torch to 2 threads; later tests (and their exact comparisons) get the count they started
    with, whatever order pytest runs them in."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_pipe():
    """A fresh tiny SD pipeline (ε-prediction, DDIM, SD-1 scheduler config); tests may add adapters to it."""
    return build_tiny_pipeline()


@pytest.fixture
def tiny_v_pipe():
    """The tiny pipeline switched to v-prediction (SD 2.x style)."""
    pipe = build_tiny_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    return pipe


def perturb_lora(unet, scale: float = 0.3, seed: int = 1) -> None:
    """Move LoRA weights away from their zero-initialised start so that adapted and base models differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.add_(scale * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="session")
def alpha_one_model(tmp_path_factory):
    """The tiny model saved with set_alpha_to_one = True: DDIM's last step lands on ᾱ = 1, where σ = 0 at any η."""
    pipe = build_tiny_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    path = tmp_path_factory.mktemp("alpha-one")
    pipe.save_pretrained(path)
    return path
