"""The clipped-surrogate update that DDPO and LOOP share: roll out, then inner epochs over (trajectory, timestep) pairs.

DDPO (Black et al., arXiv 2305.13301, §4.3 and the official kvablack/ddpo-pytorch) and LOOP (Gupta et al.,
arXiv 2503.00897) differ only in how rewards become advantages. What both do, and this module implements:

    1. Roll out B trajectories with stochastic DDIM (η > 0), storing log p_old of every step; score the images
       without building a graph, so any reward works, differentiable or not.
    2. (the trainer's own advantages A, one per trajectory, shared by all its steps; clipped to ±adv_clip_max)
    3. For each inner epoch: shuffle the trajectories and draw, for each trajectory separately, a random subset of
       ⌊S · timestep_fraction⌋ of its S stochastic steps (all T steps of DDIM with η > 0, except a last step with
       σ = 0 when the scheduler sets ᾱ to 1 there: that step has no density, and DDPO's official code never meets
       it because SD's scheduler config has set_alpha_to_one = False). For each micro-batch of `train_batch_size`
       trajectories and each drawn slot j, recompute log p_θ(x_{t'} | x_t) with CFG in one batched UNet call (every
       row at its own timestep) and minimise PPO's clipped surrogate. Gradients accumulate over the slots and over
       `train.gradient_accumulation_steps` micro-batches before each optimiser step (DDPO's accumulation rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffrl.errors import UserInputError
from diffrl.metrics import reward_metrics
from diffrl.policy_gradient import ppo_clipped_loss
from rewards import Reward, score

if TYPE_CHECKING:  # the config classes must import without diffusers (config parsing, `diffrl list`)
    from diffrl.optimization import Optimization
    from diffrl.sampler import SDSampler
    from diffrl.trajectory import Trajectory


@dataclass
class ClippedSurrogateConfig:
    inner_epochs: int = 1                  # passes over each rollout batch (DDPO: 1)
    train_batch_size: int | None = None    # trajectories per micro-batch (UNet call); None: all of the step's
    timestep_fraction: float = 1.0         # share of the T steps trained per trajectory and epoch (DDPO: 1.0)
    clip_range: float = 1e-4               # PPO ε: ρ is clipped to [1 − ε, 1 + ε] (DDPO: 1e-4)
    adv_clip_max: float | None = 5.0       # advantages clipped to ±this (DDPO: 5); None: no clipping
    seed: int = 0                          # seed of the trainer's own draws (shuffles, timestep subsets)


def trained_slots(config: ClippedSurrogateConfig, num_steps: int) -> int:
    """How many of its ``num_steps`` stochastic steps each trajectory trains per epoch: ⌊S · timestep_fraction⌋,
    as DDPO's ⌊T · timestep_fraction⌋ (scripts/train.py: num_train_timesteps) when every step is stochastic."""
    return int(num_steps * config.timestep_fraction)


def optimizer_steps_per_rollout(config: ClippedSurrogateConfig, section: str, num_trajectories: int,
                                num_steps: int, accumulation: int) -> float:
    """Optimiser steps one trainer step takes; refuses settings where a step would straddle two rollouts."""
    if config.inner_epochs < 1:
        raise UserInputError(f"{section}.inner_epochs must be at least 1, got {config.inner_epochs}")
    if not 0.0 < config.timestep_fraction <= 1.0 or trained_slots(config, num_steps) < 1:
        raise UserInputError(f"{section}.timestep_fraction must be in (0, 1] and leave at least one of the "
                             f"{num_steps} steps to train, got {config.timestep_fraction}")
    if config.clip_range <= 0 or (config.adv_clip_max is not None and config.adv_clip_max <= 0):
        raise UserInputError(f"{section}.clip_range and {section}.adv_clip_max must be positive")
    batch = config.train_batch_size or num_trajectories
    per_step = batch * accumulation
    if batch < 1 or num_trajectories % per_step:
        raise UserInputError(
            f"each step rolls out {num_trajectories} trajectories, which must be a multiple of {section}."
            f"train_batch_size ({batch}) × train.gradient_accumulation_steps ({accumulation}), so that every "
            "optimiser step sees whole micro-batches of one rollout")
    return config.inner_epochs * num_trajectories / per_step


def require_stochastic(sampler: SDSampler, method: str) -> None:
    """The policy-gradient trainers train the likelihoods of the sampler's stochastic steps (the papers': DDIM with
    η = 1; any kernel with a density serves, e.g. a few-step student's euler_ancestral or lcm steps)."""
    sampler.require_transitions(method)
    if not sampler.stochastic_steps:
        raise UserInputError(f"{method} optimises the likelihood of stochastic steps: set sample.eta > 0 with "
                             "sample.scheduler=ddim (the paper uses 1.0), or sample euler_ancestral or lcm with at "
                             "least 2 steps; this sampler has no log-probabilities")


def stochastic_slots(sampler: SDSampler, config: ClippedSurrogateConfig, section: str) -> int:
    """Backward passes per trajectory and epoch (⌊S · timestep_fraction⌋), refused when that leaves none."""
    slots = trained_slots(config, len(sampler.stochastic_steps))
    if slots < 1:
        raise UserInputError(f"{section}.timestep_fraction={config.timestep_fraction} leaves none of the sampler's "
                             f"{len(sampler.stochastic_steps)} stochastic steps to train")
    return slots


def stochastic_step_draws(sampler: SDSampler, config: ClippedSurrogateConfig, rows: int,
                          generator: torch.Generator) -> Tensor:
    """[rows, slots] step indices: for each trajectory a random subset of the sampler's stochastic steps."""
    stochastic = torch.tensor(sampler.stochastic_steps)
    slots = trained_slots(config, len(stochastic))
    return stochastic[torch.stack([torch.randperm(len(stochastic), generator=generator)[:slots] for _ in range(rows)])]


@torch.no_grad()
def rollout(sampler: SDSampler, reward: Reward, prompts: list[str]) -> tuple[Trajectory, Tensor, dict[str, Tensor]]:
    """Step 1: trajectories with their log-probs, and float32 rewards computed without a graph."""
    traj = sampler.sample(prompts)
    rewards, components = score(reward, traj.images, prompts)
    return traj, rewards.float(), components


def train_on_rollout(traj: Trajectory, advantages: Tensor, *, sampler: SDSampler, optimization: Optimization,
                     config: ClippedSurrogateConfig, generator: torch.Generator) -> dict[str, Tensor]:
    """Step 3: the inner epochs. Returns the mean surrogate loss, approx-KL, clip fraction and grad norm."""
    n, device = len(traj), traj.latents.device
    batch = config.train_batch_size or n
    if config.adv_clip_max is not None:
        advantages = advantages.clamp(-config.adv_clip_max, config.adv_clip_max)
    conditioning, negative = traj.conditioning, traj.negative_conditioning
    losses, approx_kls, clip_fractions, grad_norms = [], [], [], []
    for _ in range(config.inner_epochs):
        order = torch.randperm(n, generator=generator)
        steps = stochastic_step_draws(sampler, config, n, generator)
        for start in range(0, n, batch):
            rows = order[start:start + batch]
            rows_on_device = rows.to(device)
            for slot in range(steps.shape[1]):
                i = steps[rows, slot].to(device)
                with optimization.accumulate():
                    log_probs, _ = sampler.transition_log_prob(
                        traj.latents[rows_on_device, i], traj.latents[rows_on_device, i + 1], i,
                        conditioning[rows_on_device], None if negative is None else negative[rows_on_device])
                    loss, stats = ppo_clipped_loss(log_probs, traj.log_probs[rows_on_device, i],
                                                   advantages[rows_on_device], config.clip_range)
                    grad_norm = optimization.step(loss)
                losses.append(loss.detach())
                approx_kls.append(stats.approx_kl)
                clip_fractions.append(stats.clip_fraction)
                if grad_norm is not None:
                    grad_norms.append(grad_norm)
    metrics = {"loss": torch.stack(losses).mean(), "approx_kl": torch.stack(approx_kls).mean(),
               "clip_fraction": torch.stack(clip_fractions).mean()}
    if grad_norms:
        metrics["grad_norm"] = torch.stack([torch.as_tensor(g, device=device).float() for g in grad_norms]).mean()
    return metrics


def rollout_metrics(rewards: Tensor, components: dict[str, Tensor], advantages: Tensor) -> dict[str, Tensor]:
    return {**reward_metrics(rewards, components), "advantage_abs_mean": advantages.abs().mean()}
