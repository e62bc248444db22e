"""Z-Image (ZImagePipeline): a single-stream rectified-flow transformer (ZImageTransformer2DModel). Image patches and
caption tokens each pass their own refiner blocks, then one sequence of both runs through the main blocks, with 3-axis
rotary positions. The caption tokens are the hidden states of the second-to-last layer of a Qwen3 decoder reading the
prompt in its chat template, only the prompt's own tokens (the padding is dropped, so each sample has its own length).
16-channel latents at 1/8 of the image side, (z − 0.1159)·0.3611 (FLUX.1's VAE), cut by the transformer into 2x2
patches.

Two conventions differ from SD3 and FLUX. The transformer is called with the time 1 − σ (t = 1000·σ becomes
(1000 − t)/1000, which it multiplies by t_scale = 1000 itself) and predicts x0 − ε, so the pipeline negates its output
into the flow velocity ε − x0 that FlowMatchEulerDiscreteScheduler steps with; denoise does both. And ZImagePipeline's
guidance is pos + s·(pos − neg), which is uncond + (s + 1)·(cond − uncond): the sampler's guidance_scale w is the
pipeline's s + 1 (Z-Image-Turbo's s = 0 is w = 1, no CFG). The pipeline's optional cfg_normalization (rescale the
guided output to at most that multiple of the conditional output's norm) and cfg_truncation (drop guidance late in
sampling) are off by default and not reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from diffrl.errors import UserInputError
from diffrl.families.adapter import DiffusersAdapter


@dataclass
class ZImageConditioning:
    """The caption features of B samples. ZImagePipeline keeps them as a list of [L_i, D] tensors, one length per
    prompt; here they are right-padded to one length, with a mask of the real tokens, so that rows select, repeat and
    concatenate like any batch. ``captions()`` gives the pipeline's list back, value for value."""

    prompt_embeds: Tensor   # [B, L, D] Qwen3's second-to-last hidden states, zero after each prompt's tokens
    prompt_mask: Tensor     # [B, L] bool, True on the prompt's own tokens (a prefix of each row)

    @classmethod
    def from_captions(cls, captions: list[Tensor], length: int) -> ZImageConditioning:
        """Pad the pipeline's list of [L_i, D] caption features to [B, length, D]."""
        embeds = captions[0].new_zeros(len(captions), length, captions[0].shape[-1])
        mask = torch.zeros(len(captions), length, dtype=torch.bool, device=captions[0].device)
        for row, caption in enumerate(captions):
            embeds[row, :len(caption)], mask[row, :len(caption)] = caption, True
        return cls(embeds, mask)

    def captions(self) -> list[Tensor]:
        """The [L_i, D] caption features of each row, as ZImagePipeline.encode_prompt returns them."""
        return [embeds[mask] for embeds, mask in zip(self.prompt_embeds, self.prompt_mask)]

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, rows) -> ZImageConditioning:
        return ZImageConditioning(self.prompt_embeds[rows], self.prompt_mask[rows])

    def repeat(self, n: int) -> ZImageConditioning:
        """n copies of the batch one after another, like ``torch.cat([self] * n)``."""
        return ZImageConditioning(self.prompt_embeds.repeat(n, 1, 1), self.prompt_mask.repeat(n, 1))

    @classmethod
    def cat(cls, parts: list[ZImageConditioning]) -> ZImageConditioning:
        return cls(torch.cat([part.prompt_embeds for part in parts]), torch.cat([part.prompt_mask for part in parts]))


class ZImageFamily(DiffusersAdapter):
    name = "zimage"
    description = "Z-Image (single-stream transformer, Qwen3 text encoder, flow matching)"
    pipeline_classes = ("ZImagePipeline",)
    # The attention projections and SwiGLU feed-forward of every block: the main layers and both refiners (the
    # context refiner's blocks read only caption tokens). The adaLN modulations, embedders and final layer stay frozen.
    lora_target_modules = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    upcasts_fp16_vae = False   # ZImagePipeline decodes in the VAE's own dtype
    guidance = "cfg"           # two batched halves; sample.guidance_scale = the pipeline's guidance_scale + 1
    default_scheduler = "flow_euler"
    lora_component = "transformer"
    max_sequence_length = 512  # Qwen3 tokens per prompt, chat template included: ZImagePipeline's default
    pipeline_resolution = 1024  # ZImagePipeline's default height and width

    def __init__(self, pipe):
        self.pipe, self.denoiser, self.vae = pipe, pipe.transformer, pipe.vae

    def default_resolution(self) -> int:
        """ZImagePipeline's default image side, 1024 px, which it fixes whatever the model. A pipeline given a
        ``default_sample_size`` (latent pixels, FluxPipeline's attribute; the built-in tiny-zimage sets it) uses that
        times the VAE's downsampling instead."""
        size = getattr(self.pipe, "default_sample_size", None)
        return self.pipeline_resolution if size is None else size * self.pipe.vae_scale_factor

    def timestep_kwargs(self, num_steps: int, resolution: int) -> dict:
        """ZImagePipeline's schedule: σ = linspace(1, 1/n, n) in float32 (its get_default_z_image_sigmas) before the
        scheduler's shift, and μ from the image's count of 2x2 patches (calculate_shift over the scheduler config).
        The pipeline passes both whatever the config; Z-Image-Turbo's static shift 3 ignores μ."""
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

        config = self.pipe.scheduler.config
        tokens = (resolution // self.pipe.vae_scale_factor // 2) ** 2
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return {"sigmas": get_default_z_image_sigmas(num_steps), "mu": mu}

    def latent_shape(self, batch_size: int, resolution: int) -> tuple[int, ...]:
        """[B, C, R/f, R/f]; the transformer cuts the latent grid into 2x2 patches, so R must be a multiple of 2f (the
        pipeline's own check)."""
        factor = self.pipe.vae_scale_factor
        if resolution % (2 * factor):
            raise UserInputError(f"resolution {resolution} must be a multiple of {2 * factor} for this Z-Image model "
                                 f"(the VAE's downsampling {factor} times the transformer's 2x2 patches)")
        side = resolution // factor
        return (batch_size, self.denoiser.config.in_channels, side, side)

    def initial_latents(self, batch_size: int, resolution: int, generator=None, device=None, dtype=None) -> Tensor:
        """Noise drawn as ZImagePipeline.prepare_latents draws it: in float32 whatever the model's dtype (the
        pipeline keeps its latents in float32), then cast to ``dtype``."""
        noise = randn_tensor(self.latent_shape(batch_size, resolution), generator=generator, device=device,
                             dtype=torch.float32)
        return noise if dtype is None else noise.to(dtype)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.pipe.text_encoder]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompt: str, guidance_scale: float, resolution: int
                       ) -> tuple[ZImageConditioning, ZImageConditioning | None]:
        """The pipeline's own encode_prompt (chat template, Qwen3's second-to-last hidden states, padding dropped),
        padded into a batch. An empty negative prompt is the embedding of "" in the chat template (the pipeline's
        default too). CFG when guidance_scale > 1, the pipeline's guidance_scale > 0."""
        do_cfg = guidance_scale > 1.0
        negative = [negative_prompt] * len(prompts) if negative_prompt else None
        embeds, negative_embeds = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.denoiser.device, do_classifier_free_guidance=do_cfg,
            negative_prompt=negative, max_sequence_length=self.max_sequence_length)   # it rewrites the lists it gets
        cond = ZImageConditioning.from_captions(embeds, self.max_sequence_length)
        return cond, ZImageConditioning.from_captions(negative_embeds, self.max_sequence_length) if do_cfg else None

    def as_conditioning(self, value) -> ZImageConditioning:
        if not isinstance(value, ZImageConditioning):
            raise ValueError("a Z-Image transformer needs each prompt's token mask with the text embeddings: pass "
                             "traj.conditioning / traj.negative_conditioning or sampler.encode_prompts(...)")
        return value

    def denoise(self, denoiser, latents: Tensor, t: Tensor, conditioning: ZImageConditioning) -> Tensor:
        """The flow velocity ε − x0 at timestep t (1000·σ; one for the batch or one per row), called as ZImagePipeline
        calls its transformer: the time (1000 − t)/1000, the latents as a list of [C, 1, h, w] frames in the
        transformer's dtype, the captions as a list of their own lengths; the outputs stacked in float32 and negated."""
        timestep = (1000 - torch.as_tensor(t, device=latents.device).expand(latents.shape[0])) / 1000
        frames = list(latents.to(self.denoiser.dtype).unsqueeze(2).unbind(dim=0))
        outputs = denoiser(frames, timestep, conditioning.captions(), return_dict=False)[0]
        return -torch.stack([output.float() for output in outputs]).squeeze(2)


