"""LOOP: leave-one-out PPO for diffusion fine-tuning.

Gupta et al., "A Simple and Effective Reinforcement Learning Method for Text-to-Image Diffusion Fine-tuning",
arXiv 2503.00897. LOOP is DDPO with k samples of each prompt in the same batch and REINFORCE leave-one-out's baseline
in place of DDPO's running per-prompt statistics; it keeps PPO's clipping and importance sampling, and has no value
network.

    1. For each of the B prompts, sample k trajectories with stochastic DDIM (η > 0), storing per-step log-probs.
    2. Score the B·k images; the reward needs no gradient.
    3. A_i = R_i − (1/(k−1)) Σ_{j≠i} R_j within each prompt's group of k (optionally divided by the group's std).
    4. Inner epochs of the PPO clipped surrogate over shuffled (trajectory, timestep) pairs (diffrl.trainers.ppo).
Choices the paper leaves open (its method section was not reachable): the std division is an option
(`normalize_std`, off); ε, lr and the sampler follow DDPO; advantages are not clipped (`adv_clip_max: null`), since
leave-one-out advantages are in reward units rather than standard deviations. A group's k samples are generated on
one process, so groups never straddle processes and no gather is needed before the advantages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffrl.errors import UserInputError
from diffrl.metrics import metrics_to_floats
from diffrl.policy_gradient import leave_one_out_advantages
from diffrl.trainers.ppo import (ClippedSurrogateConfig, optimizer_steps_per_rollout, require_stochastic, rollout,
                                 rollout_metrics, stochastic_slots, train_on_rollout)
from rewards import Reward

if TYPE_CHECKING:
    from diffrl.optimization import Optimization
    from diffrl.sampler import SDSampler


@dataclass
class LoopConfig(ClippedSurrogateConfig):
    samples_per_prompt: int = 4            # k trajectories of each prompt per step (LOOP: 4); ≥ 2
    normalize_std: bool = False            # also divide A by the group's reward std (unverified in the paper)
    adv_clip_max: float | None = None      # leave-one-out advantages are in reward units: no clipping by default


class LoopTrainer:
    """LOOP: PPO-clipped policy gradient with a leave-one-out baseline over k samples per prompt."""

    backpropagates_through_sampling = False

    def __init__(self, config: LoopConfig, sampler: SDSampler, reward: Reward, optimization: Optimization, *,
                 run_dir: Path):
        require_stochastic(sampler, "LOOP")
        if config.samples_per_prompt < 2:
            raise UserInputError(f"loop.samples_per_prompt must be at least 2 for a leave-one-out baseline, "
                                 f"got {config.samples_per_prompt}")
        self.config, self.sampler, self.reward, self.optimization = config, sampler, reward, optimization
        self.generator = torch.Generator().manual_seed(config.seed)
        optimization.set_backward_passes_per_micro_batch(stochastic_slots(sampler, config, "loop"))

    @staticmethod
    def optimizer_steps_per_step(config) -> float:   # config: the run's diffrl.config.Config
        return optimizer_steps_per_rollout(
            config.loop, "loop", config.sample.batch_size * config.loop.samples_per_prompt,
            config.sample.num_steps, config.train.gradient_accumulation_steps)

    def step(self, prompts: list[str]) -> dict[str, float]:
        k = self.config.samples_per_prompt
        group_prompts = [prompt for prompt in prompts for _ in range(k)]                      # step 1
        traj, rewards, components = rollout(self.sampler, self.reward, group_prompts)         # steps 1-2
        advantages = leave_one_out_advantages(rewards.view(len(prompts), k),
                                              normalize_std=self.config.normalize_std).flatten()  # step 3
        metrics = train_on_rollout(traj, advantages, sampler=self.sampler, optimization=self.optimization,
                                   config=self.config, generator=self.generator)              # step 4
        return metrics_to_floats({**metrics, **rollout_metrics(rewards, components, advantages)})

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
