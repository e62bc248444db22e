"""Trajectory: the data contract between the sampler, the rewards and the trainers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Trajectory:
    """One batch of denoising trajectories. B = batch, T = sampling steps.

    ``latents[:, i]`` is the input of step i and ``latents[:, i + 1]`` its output, so ``latents[:, -1]`` is the final
    latent. ``log_probs[:, i]`` is log p(latents[:, i+1] | latents[:, i]) under the weights that sampled it, in
    float32, averaged over latent elements (the DDPO/DPOK convention that puts PPO clip ranges of ~1e-4 on the right
    scale); it is None for a deterministic sampler (eta = 0).
    """

    prompts: list[str]
    prompt_embeds: Tensor               # [B, L, D] conditional text embeddings used for sampling
    latents: Tensor                     # [B, T+1, C, h, w], detached
    timesteps: Tensor                   # [T] scheduler timesteps, shared by the batch
    log_probs: Tensor | None            # [B, T] float32, None when eta == 0
    images: Tensor                      # [B, 3, H, W] in [0, 1]; carries grad iff sampled with grad_last_k > 0
    negative_prompt_embeds: Tensor | None = None  # [B, L, D] unconditional embeddings; None without CFG
    noise_preds: Tensor | None = None   # [B, K, C, h, w] guided ε of the last K (differentiable) steps, with grad

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def __len__(self) -> int:
        return len(self.prompts)
