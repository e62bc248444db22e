"""SPIN-Diffusion: Self-Play Fine-Tuning of Diffusion Models for Text-to-Image Generation.

Yuan, Chen, Chen, Gu. NeurIPS 2024, arXiv 2402.10210. Needs real (prompt, image) pairs; no reward is trained on.

    for iteration k = 1, 2, ... (each with its own learning rate, β and number of steps):
        1. θ_{k-1} (the weights at the end of the previous iteration; the base model for k = 1) generates one opponent
           image for each record the iteration will train on, with the sample section's settings (paper: CFG 7.5);
           cached on disk. (Records are drawn by a seeded function of the step, so they are known in advance.)
        2. θ_{k-1} is frozen as the reference; θ_k starts from it with a fresh AdamW state.
        3. Each step, B records: winner = the real image, loser = the opponent image of the same prompt, both noised
           (shared ε by default) to one timestep t ~ U{0, ..., 999}; minimise the Diffusion-DPO-form loss
           −log σ(−½β[(‖ε − ε_θ(x^w_t)‖² − ‖ε − ε_ref(x^w_t)‖²) − (‖ε − ε_θ(x^l_t)‖² − ‖ε − ε_ref(x^l_t)‖²)])
           with errors averaged over latent elements: Diffusion-DPO's official form with its ½
           (diffrl.preference.diffusion_dpo_loss), so β is on the paper's 2000-5000 scale.
Paper presets (lr / β / steps): 2e-5 / 2000 / 50, 2e-5 / 5000 / 500, 5e-8 / 5000 / 200 (the default iterations).
Choices the paper leaves open: shared noise within a pair (the paper is ambiguous: `shared_noise`); AdamW restarts each
iteration, as a new run from θ_{k-1} would; the frozen θ_{k-1} is the same UNet with its LoRA values swapped in for
the reference calls, not a second copy. reward_mean is the configured reward of up to `reward_samples` of this iteration's opponent
images (the samples of θ_{k-1}), scored once per iteration: SPIN samples nothing else while it trains.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffrl.errors import UserInputError
from diffrl.metrics import metrics_to_floats, reward_metrics
from diffrl.preference import diffusion_dpo_loss
from diffrl.trainers.pairs import (PairDatasetConfig, cached_latents, dpo_update, generate_latents, load_pair_dataset,
                                   lora_values, record_batch, record_seed, records_of_steps, score_latents,
                                   settings_key)
from rewards import Reward

if TYPE_CHECKING:
    from diffrl.optimization import Optimization
    from diffrl.sampler import SDSampler


@dataclass
class SpinIteration:
    learning_rate: float                   # AdamW learning rate of this iteration (replaces train.learning_rate)
    beta: float                            # β of −log σ(−½β(model_diff − ref_diff)), errors = means over elements
    steps: int                             # trainer steps of this iteration


def _paper_iterations() -> list[SpinIteration]:
    return [SpinIteration(2e-5, 2000.0, 50), SpinIteration(2e-5, 5000.0, 500), SpinIteration(5e-8, 5000.0, 200)]


@dataclass
class SpinConfig(PairDatasetConfig):
    iterations: list[SpinIteration] = field(default_factory=_paper_iterations)  # paper's three iterations
    shared_noise: bool = True              # both members of a pair get the same ε (Diffusion-DPO's form)
    reward_samples: int = 256              # opponents per iteration scored with the reward (reward_mean)
    seed: int = 0                          # seed of the trainer's own draws and of the opponents' noise


class SpinTrainer:
    """SPIN-Diffusion: self-play against the previous iteration, real images as winners."""

    backpropagates_through_sampling = False

    def __init__(self, config: SpinConfig, sampler: SDSampler, reward: Reward, optimization: Optimization, *,
                 run_dir: Path):
        if not config.iterations or any(it.steps < 1 or it.beta <= 0 or it.learning_rate <= 0
                                        for it in config.iterations):
            raise UserInputError("spin.iterations must list at least one {learning_rate, beta, steps}, each positive")
        if config.reward_samples < 1:
            raise UserInputError(f"spin.reward_samples must be at least 1, got {config.reward_samples}")
        self.config, self.sampler, self.reward, self.optimization = config, sampler, reward, optimization
        self.run_dir, self.generator = run_dir, torch.Generator().manual_seed(config.seed)
        self.dataset = load_pair_dataset(config, "spin", sampler, run_dir)
        self.steps_done, self.iteration = 0, -1          # iteration: 0-based index into config.iterations
        self.frozen: list[torch.Tensor] | None = None    # θ_{k-1}'s LoRA values: the reference and opponent maker
        self.opponents = self.opponent_rewards = None

    @staticmethod
    def optimizer_steps_per_step(config) -> float:   # config: the run's diffrl.config.Config
        total = sum(it.steps for it in config.spin.iterations)
        if config.train.steps > total:
            raise UserInputError(f"train.steps ({config.train.steps}) is more than spin.iterations plan "
                                 f"({' + '.join(str(it.steps) for it in config.spin.iterations)} = {total}); "
                                 "lower train.steps or add an iteration")
        accumulation = config.train.gradient_accumulation_steps
        if any(it.steps % accumulation for it in config.spin.iterations):
            raise UserInputError(f"each of spin.iterations' steps must be a multiple of train.gradient_accumulation_"
                                 f"steps ({accumulation}), so that no optimiser step mixes two iterations")
        return 1 / accumulation   # one micro-batch per step

    def iteration_of(self, step: int) -> int:
        end = 0
        for index, iteration in enumerate(self.config.iterations):
            end += iteration.steps
            if step < end:
                return index
        return len(self.config.iterations) - 1

    def step(self, prompts: list[str]) -> dict[str, float]:
        k = self.iteration_of(self.steps_done)
        if k != self.iteration:
            self._begin_iteration(k)                                                              # step 2
        if self.opponents is None:
            self._load_opponents(len(prompts))                                                    # step 1
        dataset, iteration = self.dataset, self.config.iterations[k]
        indices = record_batch(len(dataset.prompts), self.steps_done, len(prompts), self.config.seed)
        rows = [self.opponent_rows[i] for i in indices]
        timesteps = torch.randint(self.sampler.num_train_timesteps, (len(indices),), generator=self.generator)
        metrics = dpo_update(self.sampler, self.optimization, dataset.latents[indices], self.opponents[rows],
                             [dataset.prompts[i] for i in indices], timesteps,
                             functools.partial(diffusion_dpo_loss, beta=iteration.beta),
                             shared_noise=self.config.shared_noise, generator=self.generator,
                             reference=lambda: lora_values(self.optimization.params, self.frozen))      # step 3
        self.steps_done += 1
        return metrics_to_floats({**metrics, "iteration": k + 1, **reward_metrics(self.opponent_rewards)})

    def _begin_iteration(self, k: int) -> None:
        """θ_{k-1} := the current weights, frozen; this iteration's learning rate; a fresh optimiser state."""
        self.iteration, self.opponents = k, None
        self.frozen = [p.detach().clone() for p in self.optimization.params]
        self.optimization.restart(self.config.iterations[k].learning_rate)

    def iteration_steps(self, k: int) -> range:
        start = sum(it.steps for it in self.config.iterations[:k])
        return range(start, start + self.config.iterations[k].steps)

    def _load_opponents(self, batch_size: int) -> None:
        sampler, config, k = self.sampler, self.config, self.iteration
        records = records_of_steps(len(self.dataset.prompts), self.iteration_steps(k), batch_size, config.seed)
        prompts = [self.dataset.prompts[i] for i in records]
        weights = hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for t in self.frozen)).hexdigest()[:16]
        key = settings_key(self.dataset.key, weights, records, sampler.scheduler_name, sampler.schedule, sampler.eta,
                           sampler.num_steps, sampler.guidance_scale, sampler.resolution, config.seed)

        def generate() -> torch.Tensor:
            seeds = [record_seed(config.seed, k + 1, i) for i in records]
            with lora_values(self.optimization.params, self.frozen):
                return generate_latents(sampler, prompts, seeds, config.generation_batch_size)

        path = self.run_dir / "spin" / f"opponents-iteration-{k + 1}.safetensors"
        self.opponents = cached_latents(path, key, generate)        # row j: record records[j]
        self.opponent_rows = {record: row for row, record in enumerate(records)}
        # Decoding and scoring every opponent would cost a VAE decode and a reward call per training pair; a fixed
        # sample of the iteration's opponents measures the previous iteration as well.
        scored = slice(0, config.reward_samples)
        self.opponent_rewards = score_latents(sampler, self.reward, self.opponents[scored], prompts[scored],
                                              config.generation_batch_size)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "steps_done": self.steps_done, "iteration": self.iteration,
                "frozen": [] if self.frozen is None else [t.cpu() for t in self.frozen]}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.steps_done, self.iteration = state["steps_done"], state["iteration"]
        device = self.optimization.params[0].device
        self.frozen = [t.to(device) for t in state["frozen"]] or None
        self.opponents = self.opponent_rewards = None   # read back from this iteration's cache at the next step
