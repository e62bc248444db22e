"""PSO: Tuning Timestep-Distilled Diffusion Model Using Pairwise Sample Optimization.

Miao et al., ICLR 2025, arXiv 2410.03190 (official code ZichenMiao/Pairwise_Sample_Optimization, read, not copied).
For few-step students (SD-Turbo with Euler ancestral, LCM-LoRA with LCM; sample.scheduler). The reference is the
frozen initial student: the base model with the LoRA adapters off.

Online (the paper's reward fine-tuning; as the official code does it):
    1. For each of B prompts sample two trajectories from different noise with the current student, keeping every
       latent of its few-step stochastic schedule.
    2. Score both images; the higher reward is the winner of the pair (a tie gives the pair no gradient).
    3. For each stochastic step s (the last, deterministic step has no density): log r_s = log p_θ − log p_ref of
       that transition for both members, clamped to [log 0.9, log 1.1] (ratio_clamp), and
       loss_s = −log σ(β (log r_s^win − log r_s^lose)); the update is the mean over steps and pairs
       (diffrl.preference.pso_online_loss; one backward per step, accumulated into one optimiser step).
Offline (the paper's distribution alignment, e.g. personalisation):
    1. Once, the initial student generates one reference image per dataset record (cached on disk).
    2. Each step, B records: winner = the dataset image, loser = the reference image; both noised with the same ε to
       the same timestep, drawn from the student's own few-step grid; the Diffusion-DPO loss (diffrl.preference)
       against the initial student, in its logistic form (the released scripts' hinge settings reduce to plain
       fine-tuning on the targets).
Choices the paper leaves open: samples are drawn with the global (checkpointed) RNG as in DDPO; offline β defaults to
Diffusion-DPO's 5000 (errors averaged over latent elements); offline reward_mean is the reward of a fresh few-step
sample of the batch's prompts each step, which costs only the student's 1-4 UNet calls.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from diffrl.errors import UserInputError
from diffrl.metrics import metrics_to_floats, reward_metrics
from diffrl.preference import pso_offline_loss, pso_online_loss
from diffrl.trainers.pairs import (PairDatasetConfig, cached_latents, dpo_update, generate_latents, load_pair_dataset,
                                   record_batch, record_seed, settings_key)
from rewards import Reward, score

if TYPE_CHECKING:
    from diffrl.optimization import Optimization
    from diffrl.sampler import SDSampler


@dataclass
class PsoConfig(PairDatasetConfig):
    mode: Literal["online", "offline"] = "online"  # online: reward-ranked pairs of own samples; offline: dataset
    beta: float | None = None              # None: official 50 online; 200 offline (`--beta_pso`; no ½, see above)
    loser_weight: float = 0.1              # offline λ: diff = e(w) − λ e(l) (official `--neg_defactor` 0.1)
    ratio_clamp: list[float] = field(default_factory=lambda: [0.9, 1.1])  # online per-step likelihood-ratio clamp
    shared_noise: bool = True              # offline: both members of a pair get the same ε (Diffusion-DPO)
    seed: int = 0                          # seed of the trainer's own draws (offline timesteps and noise)


class PsoTrainer:
    """Pairwise sample optimisation of a few-step student against its frozen initial copy."""

    backpropagates_through_sampling = False

    def __init__(self, config: PsoConfig, sampler: SDSampler, reward: Reward, optimization: Optimization, *,
                 run_dir: Path):
        sampler.require_transitions("PSO")
        if len(config.ratio_clamp) != 2 or not 0 < config.ratio_clamp[0] < 1 < config.ratio_clamp[1]:
            raise UserInputError(f"pso.ratio_clamp must be [low, high] with 0 < low < 1 < high, got {config.ratio_clamp}")
        if config.loser_weight < 0:
            raise UserInputError(f"pso.loser_weight must be non-negative, got {config.loser_weight}")
        self.config, self.sampler, self.reward, self.optimization = config, sampler, reward, optimization
        self.beta = config.beta if config.beta is not None else (50.0 if config.mode == "online" else 200.0)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.steps_done, self.run_dir = 0, run_dir
        if config.mode == "online":
            if config.dataset is not None:
                raise UserInputError("pso.dataset is used by pso.mode=offline; online PSO ranks its own samples")
            if not sampler.stochastic_steps:
                raise UserInputError("online PSO compares the likelihoods of stochastic steps, and this sampler has "
                                     "none: use sample.scheduler=euler_ancestral or lcm with sample.num_steps >= 2, "
                                     "or ddim with sample.eta > 0")
            optimization.set_backward_passes_per_micro_batch(len(sampler.stochastic_steps))
        else:
            self.dataset = load_pair_dataset(config, "pso", sampler, run_dir)
            self.reference_latents = None      # generated at the first step (or read from the run's cache)
            # the student's own timesteps: integers on a diffusion model (trailing spacing), the flow scheduler's
            # σ·1000 values on a flow model, whose forward process is continuous in t
            self.grid = sampler.timesteps.cpu() if sampler.is_flow_model else sampler.timesteps.round().long().cpu()

    @staticmethod
    def optimizer_steps_per_step(config) -> float:   # config: the run's diffrl.config.Config
        return 1 / config.train.gradient_accumulation_steps   # one micro-batch per step

    def step(self, prompts: list[str]) -> dict[str, float]:
        metrics = self._online_step(prompts) if self.config.mode == "online" else self._offline_step(len(prompts))
        self.steps_done += 1
        return metrics_to_floats(metrics)

    # -- online -------------------------------------------------------------------------------------------------
    def _online_step(self, prompts: list[str]) -> dict[str, Tensor]:
        sampler, n = self.sampler, len(prompts)
        with torch.no_grad():                                                                       # steps 1-2
            traj = sampler.sample(list(prompts) * 2)
            rewards, components = score(self.reward, traj.images, traj.prompts)
            rewards = rewards.float()
        rewards_a, rewards_b = rewards[:n], rewards[n:]
        losses, accuracies, clipped, grad_norm = [], [], [], None
        low, high = (math.log(bound) for bound in self.config.ratio_clamp)
        for s in sampler.stochastic_steps:                                                          # step 3
            args = (traj.latents[:, s], traj.latents[:, s + 1], s, traj.conditioning, traj.negative_conditioning)
            with self.optimization.accumulate():
                with torch.no_grad():
                    reference = sampler.transition_log_prob(*args, reference=True)[0]
                log_ratios = sampler.transition_log_prob(*args)[0] - reference
                loss, stats = pso_online_loss(log_ratios[:n, None], log_ratios[n:, None], rewards_a, rewards_b,
                                              self.beta, tuple(self.config.ratio_clamp))
                step_grad_norm = self.optimization.step(loss)
            if step_grad_norm is not None:
                grad_norm = step_grad_norm
            losses.append(loss.detach())
            accuracies.append(stats.accuracy)
            clipped.append(((log_ratios.detach() < low) | (log_ratios.detach() > high)).float().mean())
        metrics = {"loss": torch.stack(losses).mean(), "preference_accuracy": torch.stack(accuracies).mean(),
                   "ratio_clipped_fraction": torch.stack(clipped).mean(),
                   "tied_pairs": (rewards_a == rewards_b).float().mean(), **reward_metrics(rewards, components)}
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        return metrics

    # -- offline ------------------------------------------------------------------------------------------------
    def _offline_step(self, batch_size: int) -> dict[str, Tensor]:
        sampler, dataset = self.sampler, self.dataset
        if self.reference_latents is None:                                                          # step 1
            self.reference_latents = self._initial_student_latents()
        indices = record_batch(len(dataset.prompts), self.steps_done, batch_size, self.config.seed)
        prompts = [dataset.prompts[i] for i in indices]
        timesteps = self.grid[torch.randint(len(self.grid), (len(indices),), generator=self.generator)]
        loss = functools.partial(pso_offline_loss, beta=self.beta, loser_weight=self.config.loser_weight)
        metrics = dpo_update(sampler, self.optimization, dataset.latents[indices], self.reference_latents[indices],
                             prompts, timesteps, loss, shared_noise=self.config.shared_noise,
                             generator=self.generator)                                              # step 2
        with torch.no_grad():
            rewards, components = score(self.reward, sampler.sample(prompts).images, prompts)
        return {**metrics, **reward_metrics(rewards, components)}

    def _initial_student_latents(self) -> Tensor:
        """One image per record from the initial student (adapters off, so a resumed run makes the same ones)."""
        sampler, config = self.sampler, self.config
        key = settings_key(self.dataset.key, sampler.scheduler_name, sampler.schedule, sampler.num_steps,
                           sampler.guidance_scale, sampler.resolution, config.seed)

        def generate() -> Tensor:
            with sampler.base_model():
                seeds = [record_seed(config.seed, 0, i) for i in range(len(self.dataset.prompts))]
                return generate_latents(sampler, self.dataset.prompts, seeds, config.generation_batch_size)

        return cached_latents(self.run_dir / "pso" / "initial-student-latents.safetensors", key, generate)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.steps_done = state["steps_done"]
