"""SDXL (StableDiffusionXLPipeline): a UNet conditioned on two CLIP text encoders' hidden states plus, added to its
timestep embedding, the second encoder's pooled embedding and the micro-conditioning time ids (original size, crop
corner, target size). Also its few-step students (SDXL-Turbo, LCM-LoRA, DMD2)."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from diffrl.families.adapter import DiffusersAdapter
from diffrl.families.stable_diffusion import unet_latent_shape
from diffrl.trajectory import TextConditioning


class StableDiffusionXLFamily(DiffusersAdapter):
    name = "sdxl"
    description = "SDXL and its few-step students (UNet, two CLIP text encoders, pooled + time-id conditioning)"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    upcasts_fp16_vae = True    # SDXL's VAE overflows in fp16; its pipeline upcasts
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
        return [self.vae, self.pipe.text_encoder, self.pipe.text_encoder_2]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompt: str, guidance_scale: float, resolution: int
                       ) -> tuple[TextConditioning, TextConditioning | None]:
        """The pipeline's own encode_prompt. An empty negative prompt is passed as None, which SDXL
        (force_zeros_for_empty_prompt) turns into zero embeddings, as its pipeline does by default."""
        do_cfg = guidance_scale > 1.0
        negative = [negative_prompt] * len(prompts) if negative_prompt else None
        embeds, negative_embeds, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.denoiser.device, num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative)
        # (original size, crop top-left, target size): the pipeline's defaults for a square image at this resolution
        time_ids = embeds.new_tensor([[resolution, resolution, 0, 0, resolution, resolution]]).repeat(len(prompts), 1)
        cond = TextConditioning(embeds, pooled, time_ids)
        return cond, TextConditioning(negative_embeds, negative_pooled, time_ids) if do_cfg else None

    def as_conditioning(self, value) -> TextConditioning:
        if not (isinstance(value, TextConditioning) and value.pooled_prompt_embeds is not None):
            raise ValueError("an SDXL UNet needs the pooled text embeddings and time ids with the text embeddings: "
                             "pass traj.conditioning / traj.negative_conditioning or sampler.encode_prompts(...)")
        return value

    def denoise(self, denoiser, latents: Tensor, t: Tensor, conditioning: TextConditioning) -> Tensor:
        added = {"text_embeds": conditioning.pooled_prompt_embeds, "time_ids": conditioning.add_time_ids}
        return denoiser(latents, t, encoder_hidden_states=conditioning.prompt_embeds, added_cond_kwargs=added,
                        return_dict=False)[0]


