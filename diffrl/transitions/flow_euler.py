"""The flow-matching ODE stepped by Euler, as diffusers' FlowMatchEulerDiscreteScheduler does (SD3, FLUX): the
default sampler of the flow families, deterministic. Notation and formulas in diffrl.flow."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from diffrl.flow import euler_mean, flow_eps, flow_noised, flow_x0
from diffrl.transitions.kernel import KernelSettings, per_step
from diffrl.transitions.process import RectifiedFlow


class FlowEulerKernel:
    name = "flow_euler"
    description = "flow-matching ODE, Euler steps (SD3, FLUX; their pipelines' sampler); deterministic"
    has_density = True
    flow_matching = True
    scheduler_class = FlowMatchEulerDiscreteScheduler
    is_memoryless = False

    def __init__(self, scheduler, settings: KernelSettings):
        self.timesteps = scheduler.timesteps
        sigmas = scheduler.sigmas.to(self.timesteps.device)                     # [T + 1], σ = 0 at the end
        self.sigmas, self.sigmas_next = sigmas[:-1], sigmas[1:]
        self.stds = torch.zeros_like(self.sigmas)
        self.stochastic_steps: list[int] = []
        self.process = RectifiedFlow(scheduler)

    def draws_noise(self, i: int) -> bool:
        return False

    def model_input(self, latents: Tensor, i: int | Tensor) -> Tensor:
        return latents

    def predicted_x0(self, output: Tensor, latents: Tensor, i: int | Tensor) -> Tensor:
        return flow_x0(latents, output, per_step(self.sigmas, i, latents))

    def gaussian(self, output: Tensor, latents: Tensor, i: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x', 0, ε̂): the Euler step as a Gaussian of zero width. Computed in float32 like diffusers, which upcasts
        the sample; with half-precision outputs diffusers forms (σ' − σ) v̂ in that precision first."""
        sigma = per_step(self.sigmas, i, latents)
        mean = euler_mean(latents, output, sigma, per_step(self.sigmas_next, i, latents))
        return mean, per_step(self.stds, i, latents), flow_eps(latents, output, sigma)

    def add_noise(self, x0: Tensor, noise: Tensor, i: int | Tensor) -> Tensor:
        return flow_noised(x0, noise, per_step(self.sigmas, i, x0))
