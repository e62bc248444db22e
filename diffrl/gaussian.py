"""Pure math of the DDIM transition (Song et al., arXiv 2010.02502, eq. 12 and 16) and its Gaussian log-density.

Notation (paper -> code):
    ᾱ_t        alpha_t        cumulative product of (1 − β) at the current timestep t
    ᾱ_{t'}     alpha_prev     the same at the next (less noisy) timestep t'; scheduler.final_alpha_cumprod past 0
    x̂0, ε̂      x0, eps        predicted clean latent and predicted noise
    σ_t(η)     std            DDIM's per-step noise scale
    μ          mean           mean of p(x_{t'} | x_t)
All functions work on broadcastable tensors and hold no state; the sampler and the trainers share them.
"""

from __future__ import annotations

import math

from torch import Tensor

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def ddim_std(alpha_t: Tensor, alpha_prev: Tensor, eta: float) -> Tensor:
    """σ_t(η) = η √((1−ᾱ_{t'})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'})   (eq. 16)."""
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    return eta * variance.sqrt()


def ddim_mean(x0: Tensor, eps: Tensor, alpha_prev: Tensor, std: Tensor) -> Tensor:
    """μ = √ᾱ_{t'} x̂0 + √(1 − ᾱ_{t'} − σ²) ε̂   (eq. 12 without the noise term)."""
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).sqrt() * eps


def forward_noised(x0: Tensor, noise: Tensor, alpha: Tensor) -> Tensor:
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε: the forward process q(x_t | x0) (DDPM, Ho et al., arXiv 2006.11239, eq. 4)."""
    return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_t: Tensor) -> Tensor:
    """x̂0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t."""
    return (x_t - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()


def x0_eps_from_model_output(output: Tensor, x_t: Tensor, alpha_t: Tensor, prediction_type: str
                             ) -> tuple[Tensor, Tensor]:
    """(x̂0, ε̂) from a UNet output, written exactly as diffusers' DDIMScheduler so eta = 0 reproduces it bit for bit."""
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, output, alpha_t), output
    if prediction_type == "v_prediction":  # v = √ᾱ ε − √(1−ᾱ) x0 (Salimans & Ho, arXiv 2202.00512)
        return alpha_t.sqrt() * x_t - (1 - alpha_t).sqrt() * output, alpha_t.sqrt() * output + (1 - alpha_t).sqrt() * x_t
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std² I) per sample, MEAN over non-batch elements, in float32 whatever the inputs' dtype."""
    x, mean, std = x.float(), mean.float(), std.float()
    log_density = -((x - mean) ** 2) / (2 * std**2) - std.log() - LOG_SQRT_2PI
    return log_density.mean(dim=tuple(range(1, x.ndim)))


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean_p, σ²) ‖ N(mean_q, σ²)) per sample, mean over non-batch elements: ‖μ_p − μ_q‖² / (2σ²)."""
    squared = ((mean_p.float() - mean_q.float()) ** 2) / (2 * std.float() ** 2)
    return squared.mean(dim=tuple(range(1, squared.ndim)))
