"""The ModelFamily protocol: everything the sampler and the training loop need from a model family, so that a new
family (a new denoiser architecture, text encoders or latent layout) is one adapter file and a line in FAMILIES.

A family adapter wraps one diffusers pipeline. It names the denoiser network, turns prompts into a conditioning
object, calls the denoiser with it, maps between images and latents, and owns the LoRA file format its pipeline's
``load_lora_weights`` reads. Trainers never see it: they hand the sampler back the conditioning objects it gave them.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from diffrl.trajectory import Conditioning


class ModelFamily(Protocol):
    name: ClassVar[str]                      # the key in FAMILIES
    description: ClassVar[str]               # one line for `diffrl list`
    pipeline_classes: ClassVar[tuple[str, ...]]  # the diffusers pipeline class names this adapter serves
    lora_target_modules: ClassVar[tuple[str, ...]]  # train.lora_target_modules' default for this family
    upcasts_fp16_vae: ClassVar[bool]         # whether its pipeline decodes in float32 when the VAE says force_upcast
    default_scheduler: ClassVar[str]         # the transition kernel when sample.scheduler is unset (its pipeline's)
    guidance: ClassVar[str]                  # "cfg": classifier-free, the sampler batches both halves in one call;
    #                                          "distilled": the scale is a denoiser input in the conditioning (FLUX)
    denoiser: torch.nn.Module                # the network trained: a UNet, or a transformer
    vae: torch.nn.Module

    def __init__(self, pipe) -> None: ...
    def default_resolution(self) -> int: ...       # image side in pixels the model was trained at
    def latent_shape(self, batch_size: int, resolution: int) -> tuple[int, ...]: ...
    def initial_latents(self, batch_size: int, resolution: int, generator, device, dtype) -> Tensor: ...  # x_T,
    #                                                       drawn as the family's pipeline draws it for a generator
    def timestep_kwargs(self, num_steps: int, resolution: int) -> dict: ...   # extra scheduler.set_timesteps args
    #                                                       as the family's pipeline passes them (FLUX: sigmas, mu)
    def frozen_modules(self) -> list[torch.nn.Module]: ...   # text encoders and VAE: never trained
    def encode_prompts(self, prompts: list[str], negative_prompt: str, guidance_scale: float, resolution: int
                       ) -> tuple[Conditioning, Conditioning | None]: ...   # (conditional, unconditional or None)
    def as_conditioning(self, value) -> Conditioning: ...   # a conditioning object, or what users may pass instead
    def denoise(self, denoiser, latents: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor: ...  # model output
    def encode_images(self, pixels: Tensor) -> Tensor: ...   # [B, 3, H, W] in [-1, 1] -> latents (posterior mean)
    def decode(self, latents: Tensor) -> Tensor: ...         # latents -> [B, 3, H, W] in [0, 1], differentiable
    def add_lora(self, rank: int, alpha: float | None, target_modules) -> list[torch.nn.Parameter]: ...  # trainable
    def save_lora(self, directory: str | Path) -> Path: ...  # the denoiser's adapter, in the pipeline's LoRA format
    def load_lora(self, directory: str | Path) -> None: ...  # into the denoiser's existing adapter (exact resume)
