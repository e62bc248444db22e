"""DDPO: Training Diffusion Models with Reinforcement Learning.

Black, Janner, Du, Kostrikov, Levine. ICLR 2024, arXiv 2305.13301 (§4.3 DDPO_IS, Appendix: per-prompt stat tracking),
following the official kvablack/ddpo-pytorch. The baseline the other policy-gradient methods compare against.

    1. Sample B trajectories with DDIM η = 1, CFG 5, 50 steps, storing log p_old(x_{t'} | x_t) of every step.
    2. Score the final images; the reward needs no gradient.
    3. Advantages per prompt: A = (r − mean_p) / (std_p + 1e-6) over the last 16 rewards of that prompt, the whole
       (all-process) batch's statistics standing in until 16 have been seen; clipped to ±5. Without per-prompt
       tracking, A = (r − mean) / (std + 1e-8) over the batch (official scripts/train.py line 435).
    4. Inner epochs of the PPO clipped surrogate mean(max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε))), ε = 1e-4, over shuffled
       (trajectory, timestep) pairs, accumulating over the timesteps of each micro-batch (diffrl.trainers.ppo).
Recipe values from the paper's code: LoRA lr 3e-4, DDIM η 1, CFG 5, 50 steps, clip 1e-4, advantage clip 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffrl.metrics import metrics_to_floats
from diffrl.policy_gradient import PerPromptStatTracker
from diffrl.trainers.ppo import (ClippedSurrogateConfig, optimizer_steps_per_rollout, require_stochastic, rollout,
                                 rollout_metrics, stochastic_slots, train_on_rollout)
from rewards import Reward

if TYPE_CHECKING:
    from diffrl.optimization import Optimization
    from diffrl.sampler import SDSampler


@dataclass
class DdpoConfig(ClippedSurrogateConfig):
    per_prompt_stat_tracking: bool = True  # normalise rewards per prompt (DDPO: on); off: by the batch's statistics
    stat_buffer_size: int = 16             # rewards kept per prompt (DDPO base config: 16; its aesthetic run: 32)
    stat_min_count: int = 16               # rewards a prompt needs before its own statistics are used (DDPO: 16)


class DdpoTrainer:
    """DDPO_IS: PPO-clipped policy gradient over denoising steps with per-prompt reward normalisation."""

    backpropagates_through_sampling = False

    def __init__(self, config: DdpoConfig, sampler: SDSampler, reward: Reward, optimization: Optimization, *,
                 run_dir: Path):
        require_stochastic(sampler, "DDPO")
        self.config, self.sampler, self.reward, self.optimization = config, sampler, reward, optimization
        self.generator = torch.Generator().manual_seed(config.seed)
        self.stat_tracker = PerPromptStatTracker(config.stat_buffer_size, config.stat_min_count)
        optimization.set_backward_passes_per_micro_batch(stochastic_slots(sampler, config, "ddpo"))

    @staticmethod
    def optimizer_steps_per_step(config) -> float:   # config: the run's diffrl.config.Config
        return optimizer_steps_per_rollout(config.ddpo, "ddpo", config.sample.batch_size, config.sample.num_steps,
                                           config.train.gradient_accumulation_steps)

    def step(self, prompts: list[str]) -> dict[str, float]:
        traj, rewards, components = rollout(self.sampler, self.reward, prompts)               # steps 1-2
        advantages = self.advantages(prompts, rewards)                                         # step 3
        metrics = train_on_rollout(traj, advantages, sampler=self.sampler, optimization=self.optimization,
                                   config=self.config, generator=self.generator)              # step 4
        return metrics_to_floats({**metrics, **rollout_metrics(rewards, components, advantages)})

    def advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Per-prompt (or batch) normalised rewards, with statistics over every process's samples."""
        accelerator = self.optimization.accelerator
        all_prompts, all_rewards = list(prompts), rewards
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            all_prompts, all_rewards = gather_object(list(prompts)), accelerator.gather(rewards)
        if self.config.per_prompt_stat_tracking:
            advantages = self.stat_tracker.advantages(all_prompts, all_rewards)
        else:
            # the official batch normalisation's ε is 1e-8 (scripts/train.py line 435 at commit 1958463), where its
            # per-prompt tracker uses 1e-6 (ddpo_pytorch/stat_tracking.py lines 24, 27)
            advantages = (all_rewards - all_rewards.mean()) / (all_rewards.std(correction=0) + 1e-8)
        start = accelerator.process_index * len(prompts)
        return advantages[start:start + len(prompts)]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "stat_tracker": self.stat_tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.stat_tracker.load_state_dict(state["stat_tracker"])
