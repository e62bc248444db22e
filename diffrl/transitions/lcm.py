"""LCM multistep (Luo et al., arXiv 2310.04378; diffusers' LCMScheduler), the sampler of LCM-LoRA and DMD2:
predict the consistency function's clean latent, then re-noise it to the next timestep. Formulas in
diffrl.few_step."""

from __future__ import annotations

import torch
from diffusers import LCMScheduler
from torch import Tensor

from diffrl.few_step import lcm_boundary_scalings, lcm_step_tables, lcm_transition
from diffrl.gaussian import forward_noised, x0_eps_from_model_output
from diffrl.transitions.kernel import KernelSettings, per_step
from diffrl.transitions.process import VariancePreserving


class LCMKernel:
    name = "lcm"
    description = "LCM multistep (LCM-LoRA); stochastic except the last step"
    has_density = True
    flow_matching = False
    scheduler_class = LCMScheduler
    is_memoryless = False

    def __init__(self, scheduler, settings: KernelSettings):
        self.timesteps = scheduler.timesteps
        alphas_cumprod = scheduler.alphas_cumprod.to(self.timesteps.device)
        next_timesteps = torch.cat([self.timesteps[1:], self.timesteps[-1:]])
        self.alphas = alphas_cumprod[self.timesteps]
        self.next_scales, self.stds = lcm_step_tables(alphas_cumprod[next_timesteps])
        self.c_skip, self.c_out = lcm_boundary_scalings(self.timesteps, scheduler.config.timestep_scaling)
        self.stochastic_steps = [i for i, std in enumerate(self.stds.tolist()) if std > 0]
        self._stochastic = set(self.stochastic_steps)
        self.prediction_type = scheduler.config.prediction_type
        self.process = VariancePreserving(scheduler)
        self.clip = scheduler.config.clip_sample_range if scheduler.config.clip_sample else None

    def draws_noise(self, i: int) -> bool:
        return i in self._stochastic

    def model_input(self, latents: Tensor, i: int | Tensor) -> Tensor:
        return latents

    def predicted_x0(self, output: Tensor, latents: Tensor, i: int | Tensor) -> Tensor:
        x0 = x0_eps_from_model_output(output, latents, per_step(self.alphas, i, latents), self.prediction_type)[0]
        return x0 if self.clip is None else x0.clamp(-self.clip, self.clip)

    def gaussian(self, output: Tensor, latents: Tensor, i: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        def at(table: Tensor) -> Tensor:
            return per_step(table, i, latents)

        return lcm_transition(output, latents, at(self.alphas), at(self.c_skip), at(self.c_out),
                              at(self.next_scales), at(self.stds), self.prediction_type, self.clip)

    def add_noise(self, x0: Tensor, noise: Tensor, i: int | Tensor) -> Tensor:
        """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε at step i's timestep."""
        return forward_noised(x0, noise, per_step(self.alphas, i, x0))
