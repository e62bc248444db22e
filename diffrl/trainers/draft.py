"""DRaFT: Directly Fine-Tuning Diffusion Models on Differentiable Rewards.

Clark, Vicol, Swersky, Fleet. ICLR 2024, arXiv 2309.17400 (Algorithm 1: DRaFT, DRaFT-K, DRaFT-LV), with the
randomised truncation of AlignProp (Prabhudesai et al., arXiv 2310.03739) and the ε-KL penalty of DRaFT+.

    1. Sample x_T ~ N(0, I) and run the deterministic sampler (DDIM, η = 0 in the paper) down to x_0.
       DRaFT-K: the first T − K steps run without grad; x_K is detached; the last K UNet calls and the VAE decode
       build the graph (gradient checkpointing per UNet call). K = T is full DRaFT.
    2. Loss = −mean r(decode(x_0), prompt)                                         (Alg. 1, line "g ← ∇θ r")
       DRaFT-LV (K = 1): x_0 from a no-grad trajectory is re-noised n times to the last timestep,
       x = √ᾱ x_0 + √(1−ᾱ) ε, and each copy is denoised one step with grad; loss = −Σ_n mean r.
    3. DRaFT+ adds kl_coeff · mean‖ε_θ − ε_ref‖² over the differentiable steps (ε_ref: LoRA adapter off).
    4. One optimiser step (AdamW on the LoRA parameters; accumulation and clipping by the shared loop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from diffrl.errors import UserInputError
from diffrl.metrics import metrics_to_floats, reward_metrics
from diffrl.policy_gradient import epsilon_kl
from rewards import Reward, score

if TYPE_CHECKING:  # the config class must import without diffusers (config parsing, `diffrl list`)
    from diffrl.optimization import Optimization
    from diffrl.sampler import SDSampler

PAPER_STEPS = 50  # AlignProp's truncation settings are given on a 50-step schedule; rescaled to num_steps
MIN_ACCEPTANCE = 0.01  # a random truncation whose draws land in [1, T − 1] less often than this is refused


@dataclass
class DraftConfig:
    k: int = 1                    # differentiable last steps K; K = num_steps is full DRaFT (DRaFT paper: K=1)
    lv_samples: int = 0           # DRaFT-LV re-noised copies n of x0 (paper: n=2); 0 = off; needs k = 1
    truncation: Literal["fixed", "uniform", "gaussian"] = "fixed"  # fixed: K = k; else AlignProp's random start
    truncation_min: int = 0       # uniform: first differentiable step b ~ randint(min, max) of 50 (AlignProp: 0)
    truncation_max: int = 50      # uniform: exclusive upper end of that draw, on a 50-step scale (AlignProp: 50)
    truncation_mean: float = 42.0  # gaussian: b = int(N(mean, std)) on a 50-step scale (AlignProp: 42)
    truncation_std: float = 5.0   # gaussian: its standard deviation, on a 50-step scale (AlignProp: 5)
    kl_coeff: float = 0.0         # DRaFT+ weight of mean((ε_θ − ε_ref)²) over the differentiable steps; 0 = off
    seed: int = 0                 # seed of the trainer's own random draws (truncation K, DRaFT-LV noise)


class DraftTrainer:
    """DRaFT-K / DRaFT-LV / AlignProp truncation / DRaFT+ on a differentiable reward."""

    backpropagates_through_sampling = True   # train.gradient_checkpointing defaults to on

    def __init__(self, config: DraftConfig, sampler: SDSampler, reward: Reward, optimization: Optimization, *,
                 run_dir: Path):
        if not getattr(reward, "differentiable", False):
            raise UserInputError(
                f"DRaFT backpropagates through the reward, but {type(reward).__name__} is not differentiable; "
                "use a differentiable reward or a policy-gradient trainer")
        if not 1 <= config.k <= sampler.num_steps:
            raise UserInputError(f"draft.k must be in [1, sample.num_steps={sampler.num_steps}], got {config.k}")
        if config.lv_samples and (config.k != 1 or config.truncation != "fixed"):
            raise UserInputError("draft.lv_samples (DRaFT-LV) needs draft.k = 1 and draft.truncation = fixed")
        if config.lv_samples or config.kl_coeff:
            sampler.require_transitions("DRaFT-LV (draft.lv_samples) or DRaFT+ (draft.kl_coeff)")
        if config.lv_samples < 0 or config.kl_coeff < 0:
            raise UserInputError("draft.lv_samples and draft.kl_coeff must be non-negative")
        if config.truncation != "fixed" and truncation_acceptance(config, sampler.num_steps) < MIN_ACCEPTANCE:
            raise UserInputError(
                f"draft.truncation={config.truncation} almost never draws a first differentiable step in [1, "
                f"{sampler.num_steps - 1}] with these settings (on a 50-step scale: min {config.truncation_min}, max "
                f"{config.truncation_max}, mean {config.truncation_mean}, std {config.truncation_std}); it needs "
                "sample.num_steps >= 2 and a range inside (0, 50)")
        self.config, self.sampler, self.reward, self.optimization = config, sampler, reward, optimization
        self.generator = torch.Generator().manual_seed(config.seed)

    @staticmethod
    def optimizer_steps_per_step(config) -> float:   # config: the run's diffrl.config.Config
        return 1 / config.train.gradient_accumulation_steps   # one micro-batch per step

    def step(self, prompts: list[str]) -> dict[str, float]:
        with self.optimization.accumulate():
            if self.config.lv_samples:
                loss, rewards, components, k = *self._lv_loss(prompts), 1
                kl = None
            else:
                k = self.num_grad_steps()
                traj = self.sampler.sample(prompts, grad_last_k=k)
                rewards, components = score(self.reward, traj.images, prompts)
                loss = -rewards.mean()                                            # step 2
                kl = self._eps_kl(traj, k) if self.config.kl_coeff else None
                if kl is not None:
                    loss = loss + self.config.kl_coeff * kl                       # step 3
            grad_norm = self.optimization.step(loss)                               # step 4
        metrics = {"loss": loss.detach(), **reward_metrics(rewards, components), "k": float(k)}
        if kl is not None:
            metrics["kl"] = kl.detach()
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        return metrics_to_floats(metrics)

    def num_grad_steps(self) -> int:
        """K for this step: fixed, or K = T − b with AlignProp's random first differentiable step b.

        AlignProp (mihirp1998/AlignProp, sd_pipeline.py lines 124-132 at commit b22918a) draws b = int(N(42, 5)) or
        b = randint(0, 50) and draws again until 1 ≤ b ≤ T − 1; steps i ≥ b then keep their UNet call's graph, so
        K = T − b ∈ [1, T − 1]. On T = 50 diffrl draws exactly that; on another T the 50-step draw s is rescaled,
        b = ⌊s · T / 50⌋, before the same acceptance test. (int() truncates toward 0, which for s ≥ 1 is ⌊s⌋.)
        """
        config, T = self.config, self.sampler.num_steps
        if config.truncation == "fixed":
            return config.k
        while True:
            if config.truncation == "uniform":
                draw = torch.randint(config.truncation_min, config.truncation_max, (), generator=self.generator)
            else:
                draw = config.truncation_mean + config.truncation_std * torch.randn((), generator=self.generator)
            start = int(float(draw)) * T // PAPER_STEPS
            if 1 <= start <= T - 1:
                return T - start

    def _lv_loss(self, prompts: list[str]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """DRaFT-LV: n re-noised copies of x_0 denoised by the last step with grad, batched into one UNet call."""
        n, last = self.config.lv_samples, self.sampler.num_steps - 1
        with torch.no_grad():
            traj = self.sampler.sample(prompts)
        x0 = torch.cat([traj.latents[:, -1]] * n)   # any latent layout (FLUX's are packed [B, tokens, C])
        noise = torch.randn(x0.shape, generator=self.generator).to(x0)
        noisy = self.sampler.add_noise(x0, noise, last)      # x = √ᾱ x0 + √(1−ᾱ) ε at the last step's level
        negative = None if traj.negative_conditioning is None else traj.negative_conditioning.repeat(n)
        step = self.sampler.step(noisy, last, traj.conditioning.repeat(n), negative)
        copies = list(prompts) * n
        rewards, components = score(self.reward, self.sampler.decode(step.prev_latents), copies)
        return -rewards.mean() * n, rewards, components   # −Σ_n mean_b r: the mean over n·B copies, times n

    def _eps_kl(self, traj, k: int) -> Tensor:
        """mean‖ε_θ − ε_ref‖² over the k differentiable steps (ε_θ carries grad from sampling)."""
        first = self.sampler.num_steps - k
        with torch.no_grad():   # the base model's ε̂ of the same steps, as the kernel reads the denoiser's output
            reference = torch.stack([
                self.sampler.step(traj.latents[:, i], i, traj.conditioning, traj.negative_conditioning,
                                  reference=True, add_noise=False).noise_pred
                for i in range(first, self.sampler.num_steps)], dim=1)
        return epsilon_kl(traj.noise_preds, reference)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def truncation_acceptance(config: DraftConfig, num_steps: int) -> float:
    """The probability that one draw of the random truncation is accepted, i.e. b = ⌊s · T / 50⌋ ∈ [1, T − 1]:
    for integer s that is s ∈ [⌈50 / T⌉, 49] (none when T < 2)."""
    if num_steps < 2:
        return 0.0
    low, high = math.ceil(PAPER_STEPS / num_steps), PAPER_STEPS - 1
    if config.truncation == "uniform":
        count = max(config.truncation_max - config.truncation_min, 0)
        accepted = max(min(high, config.truncation_max - 1) - max(low, config.truncation_min) + 1, 0)
        return accepted / count if count else 0.0
    if config.truncation_std <= 0:
        return float(low <= config.truncation_mean < high + 1)
    normal = torch.distributions.Normal(config.truncation_mean, config.truncation_std)
    return float(normal.cdf(torch.tensor(high + 1.0)) - normal.cdf(torch.tensor(float(low))))
