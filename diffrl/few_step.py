"""Pure math of the few-step samplers' stochastic transitions, each a Gaussian N(mean, std² I) like DDIM's.

Distilled students (SD-Turbo, LCM-LoRA; PSO, Miao et al., arXiv 2410.03190) sample with schedulers that predict the
clean latent and re-noise it. Written as a Gaussian transition, each step has a log-density that online PSO compares
between the student and its frozen initial copy, exactly as the DDIM step's is compared in DDPO.

Euler ancestral (k-diffusion; diffusers' EulerAncestralDiscreteScheduler), latents in σ-space x = x0 + σ ε:
    d = (x − x̂0) / σ,   σ_up = √(σ'² (σ² − σ'²) / σ²),   σ_down = √(σ'² − σ_up²)
    mean = x + d (σ_down − σ),   std = σ_up            (σ' = 0 at the last step: deterministic)
LCM multistep (Luo et al., arXiv 2310.04378; diffusers' LCMScheduler), latents in the usual √ᾱ-space:
    denoised = c_out x̂0 + c_skip x,   mean = √ᾱ' denoised,   std = √(1 − ᾱ')   (last step: denoised, deterministic)
Both are written operation for operation as diffusers computes them, so a sampler built on them reproduces the
diffusers pipelines' images for the same noise.
"""

from __future__ import annotations

from torch import Tensor

from diffrl.gaussian import x0_eps_from_model_output


def euler_x0(output: Tensor, sample: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """x̂0 from the UNet output on the σ-space latent (the UNet saw sample / √(σ² + 1))."""
    if prediction_type == "epsilon":
        return sample - sigma * output
    if prediction_type == "v_prediction":
        return output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")


def euler_sigma_up(sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """σ_up = √(σ'² (σ² − σ'²) / σ²): the fresh noise of an ancestral step from σ to σ' (0 when σ' = 0)."""
    return (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5


def euler_ancestral_transition(output: Tensor, sample: Tensor, sigma: Tensor, sigma_next: Tensor,
                               prediction_type: str) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, std, ε̂) of one Euler-ancestral step from σ to σ'; ε̂ = d, the ODE's derivative, is the noise estimate."""
    x0 = euler_x0(output, sample, sigma, prediction_type)
    sigma_up = euler_sigma_up(sigma, sigma_next)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    derivative = (sample - x0) / sigma
    return sample + derivative * (sigma_down - sigma), sigma_up, derivative


def lcm_boundary_scalings(timesteps: Tensor, timestep_scaling: float, sigma_data: float = 0.5
                          ) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of the consistency model's boundary condition at these timesteps (LCM, eq. 4 discretised)."""
    scaled = timesteps * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def lcm_transition(output: Tensor, sample: Tensor, alpha_t: Tensor, c_skip: Tensor, c_out: Tensor,
                   next_scale: Tensor, std: Tensor, prediction_type: str, clip_range: float | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, std, ε̂) of one LCM step: mean = next_scale · denoised, with next_scale = √ᾱ' and std = √(1 − ᾱ'),
    or 1 and 0 at the last step, which returns the consistency function's output itself (see ``lcm_step_tables``)."""
    x0, eps = x0_eps_from_model_output(output, sample, alpha_t, prediction_type)
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    denoised = c_out * x0 + c_skip * sample
    return next_scale * denoised, std, eps


def lcm_step_tables(alphas_next: Tensor) -> tuple[Tensor, Tensor]:
    """(next_scale, std) per step from ᾱ' of each step's next timestep: re-noise to it, except at the last step."""
    next_scale, std = alphas_next.sqrt(), (1 - alphas_next).sqrt()
    next_scale[-1], std[-1] = 1.0, 0.0
    return next_scale, std
