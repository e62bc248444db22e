"""What every family adapter built on a diffusers pipeline shares: the VAE round trip of the pipeline's latents and the
denoiser's LoRA in the file format of the pipeline's ``load_lora_weights``. An adapter subclasses DiffusersAdapter,
names its denoiser's component (``unet`` or ``transformer``) and overrides what its layout changes (FLUX: packed
latents)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from diffrl.families.autoencoder import decode_latents, encode_pixels
from diffrl.lora import add_lora, load_lora_into, save_lora


class DiffusersAdapter:
    lora_component: ClassVar[str]   # the pipeline component that holds the denoiser: "unet" or "transformer"
    pipe: object
    denoiser: torch.nn.Module
    vae: torch.nn.Module

    def encode_images(self, pixels: Tensor) -> Tensor:
        return encode_pixels(self.vae, pixels)

    def decode(self, latents: Tensor) -> Tensor:
        return decode_latents(self.vae, latents)

    def add_lora(self, rank: int, alpha: float | None, target_modules) -> list[torch.nn.Parameter]:
        return add_lora(self.denoiser, rank, alpha, target_modules)

    def save_lora(self, directory: str | Path) -> Path:
        return save_lora(self.denoiser, directory, pipeline_class=type(self.pipe), component=self.lora_component)

    def load_lora(self, directory: str | Path) -> None:
        load_lora_into(self.denoiser, directory, component=self.lora_component)
