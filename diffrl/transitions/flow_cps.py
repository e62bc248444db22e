"""Coefficients-preserving sampling (Flow-CPS; Wang & Yu, arXiv 2509.05952): a stochastic flow sampler whose next
latent (1 − σ') x̂0 + σ' cos(aπ/2) ε̂ + σ' sin(aπ/2) z has exactly the forward process's coefficients, so it adds no
excess noise at low σ as the Flow-SDE does. Follows IamCreateAI/FlowCPS
flow_grpo/diffusers_patch/sd3_sde_with_logprob.py lines 52-64 at b402c7a; the last step (σ' = 0) is deterministic.
Unlike the Flow-SDE it does not keep the ODE's marginals: its step noise does not shrink with the step size, so the
coefficients are right only for the true x0; on a linear-Gaussian toy with the exact velocity it ends with 70% of the
data's variance at a = 0.7 and 100 steps, 47% at a = 1 (tests/test_flow_kernels.py's toy, measured).

Where diffrl differs: the official code's log-prob keeps only −(x' − μ)² ("remove all constants"), which drops the
1/(2 std²) factor that varies from step to step; diffrl's log_probs are the Gaussian log-densities every other kernel
gives, so likelihood ratios are the true densities' ratios. Notation and formulas in diffrl.flow."""

from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from diffrl.flow import cps_mean, cps_std, flow_eps, flow_noised, flow_x0
from diffrl.transitions.kernel import KernelSettings, per_step
from diffrl.transitions.process import RectifiedFlow


class FlowCPSKernel:
    name = "flow_cps"
    description = "coefficients-preserving flow sampling (Flow-CPS), noise σ' sin(aπ/2); stochastic but the last step"
    has_density = True
    flow_matching = True
    scheduler_class = FlowMatchEulerDiscreteScheduler
    is_memoryless = False

    def __init__(self, scheduler, settings: KernelSettings):
        self.timesteps = scheduler.timesteps
        sigmas = scheduler.sigmas.to(self.timesteps.device)                     # [T + 1], σ = 0 at the end
        self.sigmas, self.sigmas_next = sigmas[:-1], sigmas[1:]
        self.stds = cps_std(self.sigmas_next, settings.noise_level)
        self.stochastic_steps = [i for i, std in enumerate(self.stds.tolist()) if std > 0]
        self._stochastic = set(self.stochastic_steps)
        self.process = RectifiedFlow(scheduler)

    def draws_noise(self, i: int) -> bool:
        return i in self._stochastic

    def model_input(self, latents: Tensor, i: int | Tensor) -> Tensor:
        return latents

    def predicted_x0(self, output: Tensor, latents: Tensor, i: int | Tensor) -> Tensor:
        return flow_x0(latents, output, per_step(self.sigmas, i, latents))

    def gaussian(self, output: Tensor, latents: Tensor, i: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(μ, σ' sin(aπ/2), ε̂) of p(x' | x)."""
        sigma = per_step(self.sigmas, i, latents)
        x0, eps = flow_x0(latents, output, sigma), flow_eps(latents, output, sigma)
        std = per_step(self.stds, i, latents)
        return cps_mean(x0, eps, per_step(self.sigmas_next, i, latents), std), std, eps

    def add_noise(self, x0: Tensor, noise: Tensor, i: int | Tensor) -> Tensor:
        return flow_noised(x0, noise, per_step(self.sigmas, i, x0))
