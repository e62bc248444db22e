"""Flow-GRPO's SDE (Liu et al., arXiv 2505.05470, eq. 7-9): a stochastic sampler with the flow ODE's marginals, so a
flow model gets per-step Gaussian densities for policy-gradient training. Follows yifan123/flow_grpo
flow_grpo/diffusers_patch/sd3_sde_with_logprob.py (sde_step_with_logprob, lines 35-59 at ac4c86e): every step is
stochastic, the last included. diffrl draws the step noise in the latents' dtype (the official code draws it in
float32; the same numbers in float32 runs). Notation and formulas in diffrl.flow."""

from __future__ import annotations

import math

from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from diffrl.flow import flow_eps, flow_noised, flow_x0, sde_mean, sde_scale, sde_std
from diffrl.transitions.kernel import KernelSettings, per_step
from diffrl.transitions.process import RectifiedFlow

MEMORYLESS_NOISE_LEVEL = math.sqrt(2)


class FlowSDEKernel:
    name = "flow_sde"
    description = ("Flow-GRPO's SDE with the ODE's marginals, noise scale sample.noise_level (0.7; √2: memoryless, "
                   "for Adjoint Matching); every step stochastic")
    has_density = True
    flow_matching = True
    scheduler_class = FlowMatchEulerDiscreteScheduler

    def __init__(self, scheduler, settings: KernelSettings):
        self.timesteps = scheduler.timesteps
        sigmas = scheduler.sigmas.to(self.timesteps.device)                     # [T + 1], σ = 0 at the end
        self.sigmas, self.dts = sigmas[:-1], sigmas[1:] - sigmas[:-1]
        self.scales = sde_scale(self.sigmas, sigmas[1], settings.noise_level)  # σ_t
        self.stds = sde_std(self.scales, self.dts)                              # σ_t √(−Δt)
        self.stochastic_steps = [i for i, std in enumerate(self.stds.tolist()) if std > 0]
        self._stochastic = set(self.stochastic_steps)
        self.process = RectifiedFlow(scheduler)
        # a = √2 is Adjoint Matching's memoryless schedule for flow matching, σ(t)² = 2(1 − t)/t in its time t = 1 − σ
        # (Domingo-Enrich et al., arXiv 2409.08861, the flow-matching case; equation number not checked, the
        # linear-Gaussian tilt test in tests/trainers/test_adjoint_matching.py verifies it): the x term of the first
        # step's mean keeps 1 − a²/2 = 0 of x_T, so the chain forgets its start up to one step of the velocity.
        self.is_memoryless = math.isclose(settings.noise_level, MEMORYLESS_NOISE_LEVEL, rel_tol=1e-6)

    def draws_noise(self, i: int) -> bool:
        return i in self._stochastic

    def model_input(self, latents: Tensor, i: int | Tensor) -> Tensor:
        return latents

    def predicted_x0(self, output: Tensor, latents: Tensor, i: int | Tensor) -> Tensor:
        return flow_x0(latents, output, per_step(self.sigmas, i, latents))

    def gaussian(self, output: Tensor, latents: Tensor, i: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(μ, σ_t √(−Δt), ε̂) of p(x' | x)."""
        sigma = per_step(self.sigmas, i, latents)
        mean = sde_mean(latents, output, sigma, per_step(self.dts, i, latents), per_step(self.scales, i, latents))
        return mean, per_step(self.stds, i, latents), flow_eps(latents, output, sigma)

    def add_noise(self, x0: Tensor, noise: Tensor, i: int | Tensor) -> Tensor:
        return flow_noised(x0, noise, per_step(self.sigmas, i, x0))
