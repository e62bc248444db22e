"""The forward (noising) process at any training timestep, and the denoiser's noise prediction there: what
Diffusion-DPO's loss (SPIN, offline PSO) and reference-model comparisons need beyond the sampling grid. A kernel
carries the process of its model kind as ``kernel.process``."""

from __future__ import annotations

from torch import Tensor

from diffrl.flow import flow_eps, flow_noised, flow_x0
from diffrl.gaussian import forward_noised, x0_eps_from_model_output, x0_from_eps
from diffrl.transitions.kernel import per_step


class VariancePreserving:
    """DDPM's q(x_t | x0) = N(√ᾱ_t x0, (1 − ᾱ_t) I) for ε- and v-prediction denoisers (SD 1.x/2.x, SDXL), at integer
    timesteps t of the training schedule."""

    def __init__(self, scheduler):
        self.alphas_cumprod = scheduler.alphas_cumprod
        self.prediction_type = scheduler.config.prediction_type

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        alpha = per_step(self.alphas_cumprod.to(x0.device), t, x0).to(x0.dtype)
        return forward_noised(x0, noise, alpha)

    def noise_prediction(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        alpha_t = per_step(self.alphas_cumprod.to(x_t.device), t, x_t)
        return x0_eps_from_model_output(output, x_t, alpha_t, self.prediction_type)[1]

    def training_target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """ε: Diffusion-DPO's errors are ε-errors, v-prediction outputs converted (as diffrl always has)."""
        return noise

    training_prediction = noise_prediction

    def x0_from_training_prediction(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x̂0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t from training_prediction's ε̂ (DiffusionNFT's x0-parameterisation)."""
        return x0_from_eps(x_t, prediction, per_step(self.alphas_cumprod.to(x_t.device), t, x_t))


class RectifiedFlow:
    """x_σ = (1 − σ) x0 + σ ε with σ = t / num_train_timesteps, for velocity-predicting denoisers v = ε − x0 (SD3,
    FLUX): the timestep values the flow schedulers give the denoiser are σ · num_train_timesteps."""

    def __init__(self, scheduler):
        self.num_train_timesteps = scheduler.config.num_train_timesteps

    def _sigma(self, t: Tensor, like: Tensor) -> Tensor:
        sigma = t.to(like.device, like.dtype) / self.num_train_timesteps
        return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim == 1 else sigma

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return flow_noised(x0, noise, self._sigma(t, x0))

    def noise_prediction(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return flow_eps(x_t, output, self._sigma(t, x_t))

    def training_target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """v = ε − x0, the target of the rectified-flow loss SD3 is trained with (Esser et al., arXiv 2403.03206, §2;
        equation number not checked); the ε-error would weight it by (1 − σ)²."""
        return noise - x0

    def training_prediction(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return output

    def x0_from_training_prediction(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x̂0 = x_σ − σ v̂ (DiffusionNFT's x0-parameterisation)."""
        return flow_x0(x_t, prediction, self._sigma(t, x_t))
