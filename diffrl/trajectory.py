"""Trajectory: the data contract between the sampler, the rewards and the trainers; Conditioning: what the denoiser
is conditioned on besides the latents and the timestep, and TextConditioning, the form the built-in families use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class Conditioning(Protocol):
    """What the denoiser is conditioned on for a batch of B samples, one half of classifier-free guidance. Each model
    family (diffrl.families) makes and reads its own; trainers treat it as a batch (select rows, repeat, concatenate)
    and hand it back to the sampler, so no trainer needs to know which family it trains."""

    prompt_embeds: Tensor   # [B, L, D] the text embeddings (what Trajectory.prompt_embeds shows users)

    def __len__(self) -> int: ...
    def __getitem__(self, rows) -> Conditioning: ...
    def repeat(self, n: int) -> Conditioning: ...   # n copies one after another, like torch.cat([self] * n)
    @classmethod
    def cat(cls, parts: list[Conditioning]) -> Conditioning: ...


@dataclass
class TextConditioning:
    """Text conditioning as the SD families use it: SD 1.x/2.x condition on the text embeddings alone; SDXL adds its
    second text encoder's pooled embedding and the micro-conditioning time ids (original size, crop corner, target
    size). How the denoiser takes them is the family's business (ModelFamily.denoise).
    """

    prompt_embeds: Tensor                       # [B, L, D] (SDXL: both encoders' hidden states concatenated)
    pooled_prompt_embeds: Tensor | None = None  # [B, P] SDXL: text_encoder_2's projected pooled output
    add_time_ids: Tensor | None = None          # [B, 6] SDXL: (original h, w, crop top, left, target h, w)

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> TextConditioning:
        return TextConditioning(*(None if x is None else fn(x) for x in
                                  (self.prompt_embeds, self.pooled_prompt_embeds, self.add_time_ids)))

    def __getitem__(self, rows) -> TextConditioning:
        return self._map(lambda x: x[rows])

    def repeat(self, n: int) -> TextConditioning:
        """n copies of the batch one after another, like ``torch.cat([self] * n)``."""
        return self._map(lambda x: x.repeat(n, *([1] * (x.ndim - 1))))

    @classmethod
    def cat(cls, parts: list[TextConditioning]) -> TextConditioning:
        first = parts[0]
        return cls(*(None if getattr(first, name) is None else torch.cat([getattr(part, name) for part in parts])
                     for name in ("prompt_embeds", "pooled_prompt_embeds", "add_time_ids")))


@dataclass
class Trajectory:
    """One batch of denoising trajectories. B = batch, T = sampling steps.

    ``latents[:, i]`` is the input of step i and ``latents[:, i + 1]`` its output, so ``latents[:, -1]`` is the final
    latent. ``log_probs[:, i]`` is log p(latents[:, i+1] | latents[:, i]) under the weights that sampled it, in
    float32, averaged over latent elements (the DDPO/DPOK convention that puts PPO clip ranges of ~1e-4 on the right
    scale); it is None for a deterministic sampler (eta = 0). ``conditioning`` and ``negative_conditioning`` give
    the sampler back everything it needs to recompute a step (for SDXL the pooled embeddings and time ids too).
    """

    prompts: list[str]
    conditioning: Conditioning          # what the denoiser was conditioned on (text embeddings; SDXL: + pooled, ids)
    latents: Tensor                     # [B, T+1, C, h, w], detached
    timesteps: Tensor                   # [T] scheduler timesteps, shared by the batch
    log_probs: Tensor | None            # [B, T] float32, None when eta == 0
    images: Tensor                      # [B, 3, H, W] in [0, 1]; carries grad iff sampled with grad_last_k > 0
    negative_conditioning: Conditioning | None = None  # the unconditional CFG half; None without CFG
    noise_preds: Tensor | None = None   # [B, K, C, h, w] guided ε of the last K (differentiable) steps, with grad

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def prompt_embeds(self) -> Tensor:
        """[B, L, D] conditional text embeddings used for sampling (the name docs/contracts.md gives users)."""
        return self.conditioning.prompt_embeds

    @property
    def negative_prompt_embeds(self) -> Tensor | None:
        """[B, L, D] unconditional text embeddings; None without CFG."""
        return None if self.negative_conditioning is None else self.negative_conditioning.prompt_embeds
