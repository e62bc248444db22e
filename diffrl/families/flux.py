"""FLUX.1 (FluxPipeline): a rectified-flow transformer (FluxTransformer2DModel) of double-stream blocks (image and
text tokens side by side, joint attention) then single-stream blocks, with rotary position ids. The text tokens are
T5's hidden states; CLIP-L's pooled output joins the timestep embedding. 16-channel latents at 1/8 of the image
side, (z − 0.1159)·0.3611, packed into 2x2 patches: [B, (h/2)(w/2), 64]. The denoiser predicts the flow velocity
ε − x0 at σ (FlowMatchEulerDiscreteScheduler with resolution-dependent shift μ).

FLUX.1-dev is guidance-distilled: the guidance scale is a transformer input (guidance_embeds), one denoiser call per
step and no classifier-free guidance, so it travels per sample in the conditioning; FLUX.1-schnell has no guidance
input at all."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from diffrl.errors import UserInputError
from diffrl.families.adapter import DiffusersAdapter
from diffrl.families.autoencoder import decode_latents, encode_pixels


@dataclass
class FluxConditioning:
    """What FluxTransformer2DModel is conditioned on for B samples. The text position ids (zeros) and image position
    ids (the latent grid) follow from the shapes, so they are made at each call, as the pipeline makes them."""

    prompt_embeds: Tensor                 # [B, L, D] T5's last hidden states (L = max_sequence_length)
    pooled_prompt_embeds: Tensor          # [B, P] CLIP-L's pooled output
    guidance: Tensor | None = None        # [B] float32 guidance scale (FLUX.1-dev); None without guidance_embeds

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> FluxConditioning:
        return FluxConditioning(*(None if x is None else fn(x) for x in
                                  (self.prompt_embeds, self.pooled_prompt_embeds, self.guidance)))

    def __getitem__(self, rows) -> FluxConditioning:
        return self._map(lambda x: x[rows])

    def repeat(self, n: int) -> FluxConditioning:
        """n copies of the batch one after another, like ``torch.cat([self] * n)``."""
        return self._map(lambda x: x.repeat(n, *([1] * (x.ndim - 1))))

    @classmethod
    def cat(cls, parts: list[FluxConditioning]) -> FluxConditioning:
        first = parts[0]
        return cls(*(None if getattr(first, name) is None else torch.cat([getattr(part, name) for part in parts])
                     for name in ("prompt_embeds", "pooled_prompt_embeds", "guidance")))


class FluxFamily(DiffusersAdapter):
    name = "flux"
    description = "FLUX.1 (double/single-stream transformer, CLIP-L pooled + T5, flow matching, guidance-distilled)"
    pipeline_classes = ("FluxPipeline",)
    # The default of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py: both streams' attention
    # projections and feed-forwards of the double-stream blocks; "attn.to_q/k/v" also match the single-stream blocks'
    # attention (their MLP, proj_mlp, and the fused proj_out stay frozen, as in that script).
    lora_target_modules = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                           "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
    upcasts_fp16_vae = False   # FluxPipeline decodes in the VAE's own dtype
    guidance = "distilled"     # the scale is a transformer input (FLUX.1-dev) or nothing (schnell); never CFG
    default_scheduler = "flow_euler"
    lora_component = "transformer"
    max_sequence_length = 512  # T5 tokens per prompt: FluxPipeline's default

    def __init__(self, pipe):
        self.pipe, self.denoiser, self.vae = pipe, pipe.transformer, pipe.vae

    def default_resolution(self) -> int:
        """FluxPipeline's own default height: default_sample_size (128) latent pixels, 1024 px for FLUX.1."""
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def _grid_side(self, resolution: int) -> int:
        """Side of the packed token grid: R/f latent pixels in 2x2 patches."""
        return resolution // (self.pipe.vae_scale_factor * 2)

    def timestep_kwargs(self, num_steps: int, resolution: int) -> dict:
        """FluxPipeline's schedule: σ = linspace(1, 1/n, n) before the scheduler's shift, and μ from the image's
        token count (calculate_shift over the scheduler config, with FLUX's max_shift 1.15 as the fallback). The
        pipeline passes both whatever the config; a scheduler without dynamic shifting (schnell) ignores μ."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.pipe.scheduler.config
        mu = calculate_shift(self._grid_side(resolution) ** 2, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        if config.get("use_flow_sigmas"):   # a scheduler that makes its own flow sigmas: the pipeline passes none
            return {"mu": mu}
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}

    def latent_shape(self, batch_size: int, resolution: int) -> tuple[int, ...]:
        """[B, (R/2f)², 4C]: the R/f latent grid packed into 2x2 patches of C channels, so R must be a multiple of 2f
        (FluxPipeline resizes other sizes with a warning; diffrl refuses them)."""
        multiple = self.pipe.vae_scale_factor * 2
        if resolution % multiple:
            raise UserInputError(f"resolution {resolution} must be a multiple of {multiple} for this FLUX model (the "
                                 f"VAE's downsampling {self.pipe.vae_scale_factor} times the 2x2 latent packing)")
        return (batch_size, self._grid_side(resolution) ** 2, self.denoiser.config.in_channels)

    def initial_latents(self, batch_size: int, resolution: int, generator=None, device=None, dtype=None) -> Tensor:
        """Packed initial noise drawn as FluxPipeline.prepare_latents draws it: randn in the unpacked shape
        [B, C, R/f, R/f], then packed, so the same generator gives the pipeline's noise (randn in the packed shape
        would put the same numbers in other places)."""
        side = 2 * self._grid_side(resolution)
        channels = self.denoiser.config.in_channels // 4
        noise = randn_tensor((batch_size, channels, side, side), generator=generator, device=device, dtype=dtype)
        return self.pipe._pack_latents(noise, batch_size, channels, side, side)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.pipe.text_encoder, self.pipe.text_encoder_2]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompt: str, guidance_scale: float, resolution: int
                       ) -> tuple[FluxConditioning, None]:
        """The pipeline's own encode_prompt (T5 and CLIP read the same prompt), and, when the transformer embeds
        guidance, guidance_scale for every row in float32, as FluxPipeline.__call__ builds it. No unconditional
        half: the model is guidance-distilled."""
        if negative_prompt:
            raise UserInputError("sample.negative_prompt must be empty for FLUX, which is guidance-distilled: "
                                 "sample.guidance_scale is a transformer input, not classifier-free guidance")
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.denoiser.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full([len(prompts)], guidance_scale, device=embeds.device, dtype=torch.float32)
        return FluxConditioning(embeds, pooled, guidance), None

    def as_conditioning(self, value) -> FluxConditioning:
        if not isinstance(value, FluxConditioning):
            raise ValueError("a FLUX transformer needs the pooled text embeddings and the guidance scale with the "
                             "text embeddings: pass traj.conditioning or sampler.encode_prompts(...)[0]")
        return value

    def denoise(self, denoiser, latents: Tensor, t: Tensor, conditioning: FluxConditioning) -> Tensor:
        """The velocity at timestep t (1000·σ; one for the batch or one per row) of packed latents [B, N, 4C], called
        as FluxPipeline calls its transformer: t cast to the latents' dtype and divided by 1000, text ids zeros
        [L, 3], image ids (0, row, column) of the square N-token grid."""
        timestep = torch.as_tensor(t, device=latents.device).expand(latents.shape[0]).to(latents.dtype)
        embeds = conditioning.prompt_embeds
        text_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=embeds.dtype)
        side = math.isqrt(latents.shape[1])
        image_ids = self.pipe._prepare_latent_image_ids(latents.shape[0], side, side, latents.device, embeds.dtype)
        return denoiser(hidden_states=latents, timestep=timestep / 1000, guidance=conditioning.guidance,
                        pooled_projections=conditioning.pooled_prompt_embeds, encoder_hidden_states=embeds,
                        txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]

    def _unpack(self, latents: Tensor) -> Tensor:
        """[B, N, 4C] -> [B, C, h, w], the pipeline's _unpack_latents for the square image N tokens make."""
        pixels = 2 * math.isqrt(latents.shape[1]) * self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(latents, pixels, pixels, self.pipe.vae_scale_factor)

    def encode_images(self, pixels: Tensor) -> Tensor:
        latents = encode_pixels(self.vae, pixels)
        batch_size, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch_size, channels, height, width)

    def decode(self, latents: Tensor) -> Tensor:
        return decode_latents(self.vae, self._unpack(latents))


