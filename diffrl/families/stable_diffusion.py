"""Stable Diffusion 1.x/2.x (StableDiffusionPipeline): a UNet conditioned on one CLIP text encoder's hidden states,
4-channel latents at 1/8 of the image side. Also their few-step students (SD-Turbo, LCM-LoRA and DMD2 bases)."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from diffrl.errors import UserInputError
from diffrl.families.adapter import DiffusersAdapter
from diffrl.trajectory import TextConditioning


class StableDiffusionFamily(DiffusersAdapter):
    name = "sd"
    description = "Stable Diffusion 1.x/2.x and their few-step students (UNet, one CLIP text encoder)"
    pipeline_classes = ("StableDiffusionPipeline",)
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    upcasts_fp16_vae = False   # StableDiffusionPipeline never upcasts
    guidance = "cfg"           # classifier-free: two batched halves
    default_scheduler = "ddim"
    lora_component = "unet"

    def __init__(self, pipe):
        self.pipe, self.denoiser, self.vae = pipe, pipe.unet, pipe.vae

    def default_resolution(self) -> int:
        return self.denoiser.config.sample_size * self.pipe.vae_scale_factor

    def timestep_kwargs(self, num_steps: int, resolution: int) -> dict:
        return {}

    def initial_latents(self, batch_size: int, resolution: int, generator, device, dtype) -> Tensor:
        return randn_tensor(self.latent_shape(batch_size, resolution), generator=generator, device=device, dtype=dtype)

    def latent_shape(self, batch_size: int, resolution: int) -> tuple[int, ...]:
        return unet_latent_shape(self.pipe, batch_size, resolution)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.pipe.text_encoder]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompt: str, guidance_scale: float, resolution: int
                       ) -> tuple[TextConditioning, TextConditioning | None]:
        """The pipeline's own encode_prompt; an empty negative prompt is the embedding of "" (the pipeline's too)."""
        do_cfg = guidance_scale > 1.0
        negative = [negative_prompt] * len(prompts) if negative_prompt else None
        embeds, negative_embeds = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.denoiser.device, num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative)
        return TextConditioning(embeds), TextConditioning(negative_embeds) if do_cfg else None

    def as_conditioning(self, value: TextConditioning | Tensor) -> TextConditioning:
        """A TextConditioning, or the bare [B, L, D] text embeddings users may pass (docs/contracts.md)."""
        return value if isinstance(value, TextConditioning) else TextConditioning(value)

    def denoise(self, denoiser, latents: Tensor, t: Tensor, conditioning: TextConditioning) -> Tensor:
        return denoiser(latents, t, encoder_hidden_states=conditioning.prompt_embeds, return_dict=False)[0]


def unet_latent_shape(pipe, batch_size: int, resolution: int) -> tuple[int, ...]:
    """[B, C, R/f, R/f]: a UNet family's latents for square images of side R (f: the VAE's downsampling)."""
    if resolution % pipe.vae_scale_factor:
        raise UserInputError(f"resolution {resolution} must be a multiple of {pipe.vae_scale_factor}")
    side = resolution // pipe.vae_scale_factor
    return (batch_size, pipe.unet.config.in_channels, side, side)
