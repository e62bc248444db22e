"""DDIM(η) (Song et al., arXiv 2010.02502, eq. 12 and 16), written as diffusers' DDIMScheduler computes it, so that
η = 0 reproduces the pipeline bit for bit and η = 1 is DDPM's ancestral step. Notation in diffrl.gaussian."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from diffrl.gaussian import ddim_mean, ddim_std, forward_noised, x0_eps_from_model_output
from diffrl.transitions.kernel import KernelSettings, per_step
from diffrl.transitions.process import VariancePreserving


class DDIMKernel:
    name = "ddim"
    description = "DDIM, η in [0, 1] (sample.eta); every step stochastic when η > 0"
    has_density = True
    flow_matching = False
    scheduler_class = DDIMScheduler

    def __init__(self, scheduler, settings: KernelSettings):
        self.timesteps = scheduler.timesteps
        device, num_steps = self.timesteps.device, len(self.timesteps)
        alphas_cumprod = scheduler.alphas_cumprod
        # diffusers' rule for the next timestep, kept so that η = 0 matches the pipeline exactly
        prev = self.timesteps.cpu() - scheduler.config.num_train_timesteps // num_steps
        final_alpha = scheduler.final_alpha_cumprod
        if settings.midpoint_final_alpha:
            final_alpha = (1 + alphas_cumprod[self.timesteps[-1].cpu()]) / 2
        self.alphas = alphas_cumprod[self.timesteps.cpu()].to(device)                                # ᾱ_t
        self.alphas_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final_alpha).to(device)  # ᾱ_{t'}
        self.stds = ddim_std(self.alphas, self.alphas_prev, settings.eta)                           # σ_t(η)
        self.stochastic_steps = [i for i, std in enumerate(self.stds.tolist()) if std > 0]
        self._stochastic = set(self.stochastic_steps)
        # At η = 1 with σ > 0 at every step (no final ᾱ = 1) the schedule is DDPM's, which forgets x_T.
        self.is_memoryless = settings.eta == 1.0 and len(self.stochastic_steps) == num_steps
        self.prediction_type = scheduler.config.prediction_type
        self.process = VariancePreserving(scheduler)
        self.clip = scheduler.config.clip_sample_range if scheduler.config.clip_sample else None

    def draws_noise(self, i: int) -> bool:
        return i in self._stochastic

    def model_input(self, latents: Tensor, i: int | Tensor) -> Tensor:
        return latents

    def predicted_x0(self, output: Tensor, latents: Tensor, i: int | Tensor) -> Tensor:
        return self._x0_eps(output, latents, i)[0]

    def gaussian(self, output: Tensor, latents: Tensor, i: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(μ, σ_t(η), ε̂) of p(x_{t'} | x_t)."""
        x0, eps = self._x0_eps(output, latents, i)
        std = per_step(self.stds, i, latents)
        return ddim_mean(x0, eps, per_step(self.alphas_prev, i, latents), std), std, eps

    def add_noise(self, x0: Tensor, noise: Tensor, i: int | Tensor) -> Tensor:
        """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε at step i's timestep (the forward process)."""
        return forward_noised(x0, noise, per_step(self.alphas, i, x0))

    def _x0_eps(self, output: Tensor, latents: Tensor, i: int | Tensor) -> tuple[Tensor, Tensor]:
        x0, eps = x0_eps_from_model_output(output, latents, per_step(self.alphas, i, latents), self.prediction_type)
        return (x0 if self.clip is None else x0.clamp(-self.clip, self.clip)), eps
