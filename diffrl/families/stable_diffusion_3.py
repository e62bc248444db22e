"""Stable Diffusion 3 and 3.5 (StableDiffusion3Pipeline): a rectified-flow MMDiT (SD3Transformer2DModel) that runs
joint attention over image patches and text tokens. The text tokens are CLIP-L's and CLIP-G's penultimate hidden
states side by side, zero-padded to T5's width, followed by T5's hidden states; the two CLIPs' pooled projections,
concatenated, join the timestep embedding. 16-channel latents at 1/8 of the image side, (z − 0.0609)·1.5305.
The denoiser predicts the flow velocity ε − x0 at timestep 1000·σ (FlowMatchEulerDiscreteScheduler)."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from diffrl.errors import UserInputError
from diffrl.families.adapter import DiffusersAdapter
from diffrl.trajectory import TextConditioning


class StableDiffusion3Family(DiffusersAdapter):
    name = "sd3"
    description = "Stable Diffusion 3/3.5 (MMDiT transformer, CLIP-L + CLIP-G + T5 text encoders, flow matching)"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    # Both streams' attention projections, the default of diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py.
    # The "attn." prefix keeps SD3.5's second, image-only attention (attn2) out, as that script does.
    lora_target_modules = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    upcasts_fp16_vae = False   # StableDiffusion3Pipeline decodes in the VAE's own dtype
    guidance = "cfg"           # classifier-free: two batched halves
    default_scheduler = "flow_euler"
    lora_component = "transformer"
    max_sequence_length = 256  # T5 tokens per prompt: StableDiffusion3Pipeline's default

    def __init__(self, pipe):
        self.pipe, self.denoiser, self.vae = pipe, pipe.transformer, pipe.vae

    def default_resolution(self) -> int:
        return self.denoiser.config.sample_size * self.pipe.vae_scale_factor

    def timestep_kwargs(self, num_steps: int, resolution: int) -> dict:
        """μ of a scheduler with dynamic shifting, from the image's token count, as StableDiffusion3Pipeline computes
        it; SD3 and SD3.5 ship a static shift (shift 3.0), which needs nothing."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return {}
        tokens = (resolution // self.pipe.vae_scale_factor // self.denoiser.config.patch_size) ** 2
        return {"mu": calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                      config.get("base_shift", 0.5), config.get("max_shift", 1.16))}

    def initial_latents(self, batch_size: int, resolution: int, generator, device, dtype) -> Tensor:
        return randn_tensor(self.latent_shape(batch_size, resolution), generator=generator, device=device, dtype=dtype)

    def latent_shape(self, batch_size: int, resolution: int) -> tuple[int, ...]:
        """[B, C, R/f, R/f]; the transformer cuts the latent grid into patch_size² patches, so R must be a multiple
        of f·patch_size (the pipeline's own check)."""
        factor, multiple = self.pipe.vae_scale_factor, self.pipe.vae_scale_factor * self.denoiser.config.patch_size
        if resolution % multiple:
            raise UserInputError(f"resolution {resolution} must be a multiple of {multiple} for this SD3 model (the "
                                 f"VAE's downsampling {factor} times the transformer's patch size "
                                 f"{self.denoiser.config.patch_size})")
        side = resolution // factor
        return (batch_size, self.denoiser.config.in_channels, side, side)

    def frozen_modules(self) -> list[torch.nn.Module]:
        encoders = (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3)
        return [self.vae] + [encoder for encoder in encoders if encoder is not None]   # T5 is optional in SD3

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompt: str, guidance_scale: float, resolution: int
                       ) -> tuple[TextConditioning, TextConditioning | None]:
        """The pipeline's own encode_prompt; every text encoder reads the same prompt (prompt_2 and prompt_3 None),
        and an empty negative prompt is the embedding of "" (the pipeline's default too)."""
        do_cfg = guidance_scale > 1.0
        negative = [negative_prompt] * len(prompts) if negative_prompt else None
        embeds, negative_embeds, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.denoiser.device, num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative, max_sequence_length=self.max_sequence_length)
        cond = TextConditioning(embeds, pooled)
        return cond, TextConditioning(negative_embeds, negative_pooled) if do_cfg else None

    def as_conditioning(self, value) -> TextConditioning:
        if not (isinstance(value, TextConditioning) and value.pooled_prompt_embeds is not None):
            raise ValueError("an SD3 transformer needs the pooled text embeddings with the text embeddings: pass "
                             "traj.conditioning / traj.negative_conditioning or sampler.encode_prompts(...)")
        return value

    def denoise(self, denoiser, latents: Tensor, t: Tensor, conditioning: TextConditioning) -> Tensor:
        """The velocity at timestep t (1000·σ, a float; one for the batch or one per row), called as
        StableDiffusion3Pipeline calls its transformer. Unlike the UNet, the transformer neither moves t to the
        latents' device nor broadcasts a single t over the batch, so both happen here."""
        timestep = torch.as_tensor(t, device=latents.device).expand(latents.shape[0])
        return denoiser(hidden_states=latents, timestep=timestep, encoder_hidden_states=conditioning.prompt_embeds,
                        pooled_projections=conditioning.pooled_prompt_embeds, return_dict=False)[0]


