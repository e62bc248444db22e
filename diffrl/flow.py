"""Pure math of flow-matching steps (rectified flow, the SD3 and FLUX models): the Euler step of the ODE and
Flow-GRPO's SDE with the ODE's marginals (Liu et al., "Flow-GRPO", arXiv 2505.05470, eq. 7-9).

Notation (paper -> code):
    x_σ = (1 − σ) x0 + σ ε   the noisy latent at noise level σ (Flow-GRPO's t), σ = 1 pure noise
    σ, σ'      sigma, sigma_next   the current and the next step's noise level; σ' = 0 after the last step
    Δt = σ' − σ  dt                negative (sampling runs from σ = 1 to 0)
    v̂          velocity            the denoiser's output, v = ε − x0
    a          noise_level         Flow-GRPO's SDE noise scale (its default 0.7)
    σ_t        sde_scale           a √(σ / (1 − σ)), the SDE's diffusion coefficient
All functions work on broadcastable tensors and hold no state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def euler_mean(x: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """x' = x + (σ' − σ) v̂: the ODE's Euler step, as diffusers' FlowMatchEulerDiscreteScheduler.step."""
    return x + (sigma_next - sigma) * velocity


def flow_x0(x: Tensor, velocity: Tensor, sigma: Tensor) -> Tensor:
    """x̂0 = x − σ v̂."""
    return x - sigma * velocity


def flow_eps(x: Tensor, velocity: Tensor, sigma: Tensor) -> Tensor:
    """ε̂ = x + (1 − σ) v̂."""
    return x + (1 - sigma) * velocity


def flow_noised(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_σ = (1 − σ) x0 + σ ε (diffusers' FlowMatchEulerDiscreteScheduler.scale_noise)."""
    return (1 - sigma) * x0 + sigma * noise


def sde_scale(sigma: Tensor, sigma_second: Tensor, noise_level: float) -> Tensor:
    """σ_t = a √(σ / (1 − σ)), with σ = 1 in the denominator replaced by the schedule's second σ, which keeps the first
    step finite. yifan123/flow_grpo flow_grpo/diffusers_patch/sd3_sde_with_logprob.py line 47 at ac4c86e."""
    return noise_level * (sigma / (1 - torch.where(sigma == 1, sigma_second, sigma))).sqrt()


def sde_mean(x: Tensor, velocity: Tensor, sigma: Tensor, dt: Tensor, scale: Tensor) -> Tensor:
    """μ = x (1 + σ_t² Δt / (2σ)) + v̂ (1 + σ_t² (1 − σ) / (2σ)) Δt (same file, line 50): the Euler step of
    dx = [v + σ_t²/(2σ) (x + (1 − σ) v)] dσ + σ_t dW, whose marginals are the ODE's."""
    return x * (1 + scale**2 / (2 * sigma) * dt) + velocity * (1 + scale**2 * (1 - sigma) / (2 * sigma)) * dt


def sde_std(scale: Tensor, dt: Tensor) -> Tensor:
    """The step's standard deviation σ_t √(−Δt) (same file, line 59)."""
    return scale * (-dt).sqrt()


def cps_std(sigma_next: Tensor, noise_level: float) -> Tensor:
    """Coefficients-preserving sampling's step noise σ' sin(aπ/2) (Wang & Yu, "Coefficients-Preserving Sampling for
    Reinforcement Learning with Flow Matching", arXiv 2509.05952; IamCreateAI/FlowCPS
    flow_grpo/diffusers_patch/sd3_sde_with_logprob.py line 52 at b402c7a)."""
    return sigma_next * math.sin(noise_level * math.pi / 2)


def cps_mean(x0: Tensor, eps: Tensor, sigma_next: Tensor, std: Tensor) -> Tensor:
    """μ = (1 − σ') x̂0 + √(σ'² − std²) ε̂ (same file, line 55): the next latent keeps the coefficients of x0 and of
    the total noise that the forward process x_σ' = (1 − σ') x0 + σ' ε has."""
    return (1 - sigma_next) * x0 + (sigma_next**2 - std**2).sqrt() * eps
