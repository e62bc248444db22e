"""Euler ancestral (k-diffusion; diffusers' EulerAncestralDiscreteScheduler), the sampler of SD-Turbo and
SDXL-Turbo, in σ-space latents x = x0 + σ ε. Notation and formulas in diffrl.few_step."""

from __future__ import annotations

from diffusers import EulerAncestralDiscreteScheduler
from torch import Tensor

from diffrl.few_step import euler_ancestral_transition, euler_sigma_up, euler_x0
from diffrl.transitions.kernel import KernelSettings, per_step
from diffrl.transitions.process import VariancePreserving


class EulerAncestralKernel:
    name = "euler_ancestral"
    description = "Euler ancestral (SD-Turbo); stochastic except the last step"
    has_density = True
    flow_matching = False
    scheduler_class = EulerAncestralDiscreteScheduler
    is_memoryless = False

    def __init__(self, scheduler, settings: KernelSettings):
        self.timesteps = scheduler.timesteps
        sigmas = scheduler.sigmas.to(self.timesteps.device)                     # [T + 1], σ = 0 at the end
        self.sigmas, self.sigmas_next = sigmas[:-1], sigmas[1:]
        self.input_divisors = (self.sigmas**2 + 1) ** 0.5                       # the denoiser sees x / √(σ² + 1)
        self.stds = euler_sigma_up(self.sigmas, self.sigmas_next)
        self.stochastic_steps = [i for i, std in enumerate(self.stds.tolist()) if std > 0]
        self.prediction_type = scheduler.config.prediction_type
        self.process = VariancePreserving(scheduler)

    def draws_noise(self, i: int) -> bool:
        return True     # diffusers draws at every step, the last included (σ_up = 0 there)

    def model_input(self, latents: Tensor, i: int | Tensor) -> Tensor:
        # in float32 and back, as diffusers divides a half-precision sample by a float32 0-dim σ
        return (latents.float() / per_step(self.input_divisors, i, latents)).to(latents.dtype)

    def predicted_x0(self, output: Tensor, latents: Tensor, i: int | Tensor) -> Tensor:
        return euler_x0(output, latents, per_step(self.sigmas, i, latents), self.prediction_type)

    def gaussian(self, output: Tensor, latents: Tensor, i: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return euler_ancestral_transition(output, latents, per_step(self.sigmas, i, latents),
                                          per_step(self.sigmas_next, i, latents), self.prediction_type)

    def add_noise(self, x0: Tensor, noise: Tensor, i: int | Tensor) -> Tensor:
        """x = x0 + σ_i ε: step i's input noise level in σ-space."""
        return x0 + per_step(self.sigmas, i, x0) * noise
