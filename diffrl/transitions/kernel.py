"""What every transition kernel gives the sampler (the protocol), its settings, and step-table indexing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True)
class KernelSettings:
    eta: float = 1.0                       # DDIM's η: 0 deterministic, 1 DDPM's ancestral (memoryless) step
    midpoint_final_alpha: bool = False     # DDIM: final ᾱ halfway between 1 and the last step's (Adjoint Matching)
    noise_level: float = 0.7               # flow_sde's a (Flow-GRPO's default)


class TransitionKernel(Protocol):
    name: str                   # the sample.scheduler value that selects it
    description: str            # one line for `diffrl list` and error messages
    has_density: bool           # every step is a Gaussian the sampler can recompute (log-probs, trainers)
    flow_matching: bool         # for velocity-predicting flow models (SD3, FLUX); else for ε/v diffusion models
    scheduler_class: type       # the diffusers scheduler whose config and timesteps it reads
    timesteps: Tensor           # [T] the scheduler's timestep values, what the denoiser is called with
    stds: Tensor | None         # [T] float32 σ of each step's Gaussian (0: deterministic); None without a density
    stochastic_steps: list[int]  # the steps with σ > 0: the ones with a log-density
    is_memoryless: bool         # DDPM's ancestral schedule at every step (Adjoint Matching's requirement)
    process: object             # the forward process at any training timestep (diffrl.transitions.process)

    def draws_noise(self, i: int) -> bool: ...      # whether step i consumes the generator (as diffusers does)
    def model_input(self, latents: Tensor, i: int | Tensor) -> Tensor: ...
    def gaussian(self, output: Tensor, latents: Tensor, i: int | Tensor) -> tuple[Tensor, Tensor, Tensor]: ...
    def predicted_x0(self, output: Tensor, latents: Tensor, i: int | Tensor) -> Tensor: ...
    def add_noise(self, x0: Tensor, noise: Tensor, i: int | Tensor) -> Tensor: ...


def per_step(values: Tensor, i: int | Tensor, like: Tensor) -> Tensor:
    """Step i's entry of a [T] table: 0-dim for an int i (as diffusers computes), [B, 1, ...] for a [B] tensor i."""
    value = values[i]
    return value.reshape(-1, *([1] * (like.ndim - 1))) if value.ndim == 1 else value
