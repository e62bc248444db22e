"""DPOK: Reinforcement Learning for Fine-tuning Text-to-Image Diffusion Models.

Fan, Watkins, Du, Liu, Ryu, Boutilier, Abbeel, Ghavamzadeh, Lee, Lee. NeurIPS 2023, arXiv 2305.16381 (Algorithm 1),
following the official google-research/dpok (train_online_pg.py), whose choices are kept where the paper is silent.

Per round (one trainer step):
    1. Roll out B trajectories with DDIM η = 1 and CFG; push every stochastic transition (x_t, x_{t'}, step,
       log p_old, final reward, prompt, pooled text embedding) into a FIFO replay buffer of `buffer_size` transitions
       (every transition when SD's set_alpha_to_one = False; a σ = 0 last step has no density and stays out).
    2. Value function: `v_step` accumulated micro-batches of `v_batch_size` random buffer transitions,
       loss MSE(V(x_t, text embedding, step), r), then one AdamW step (lr `v_lr`). V is learned on rewards
       standardised by the buffer's mean and std, V = mean + std · V_net (see Deviation).
    3. Policy: `p_step` optimiser steps, each over train.gradient_accumulation_steps micro-batches of
       `p_batch_size` random buffer transitions, with
           loss = −α · mean(A · clamp(ρ, 1 − ε, 1 + ε)) + β · mean((ε̂_θ − ε̂_ref)²),   A = r − V(x_t) (or r),
       ρ = p_θ / p_old of the stored transition, ε̂ the CFG-combined noise predictions, ε̂_ref the base model's
       (LoRA adapter disabled). The clamp without PPO's min is the official code's (`surrogate: clamp`); PPO's
       clipped objective is `surrogate: ppo`.
Official settings: the README's single-prompt command has α = 10, β = 0.01, p_batch_size 4, 10 rollouts per round
(the argparse defaults are α = 100, p_batch_size 2); α = 1000, β = 0.1 for many prompts (recipes in assets/configs/);
ε = 1e-4, buffer 1000, p_step 5, accumulation 12, v_step 5, v_batch_size 256, v_lr 1e-4, lr 1e-5, grad clip 0.1,
LoRA rank 4. diffrl's defaults are the README's α and the argparse p_batch_size.
Deviations: the value network regresses standardised rewards and starts at V_net = 0, i.e. at the buffer's mean
reward. The official network regresses raw rewards from a random start; with ImageReward (std ≈ 1) that converges
within a few rounds, but for a reward whose spread is small (brightness, std ≈ 0.004) its error stayed 100× the
reward's variance for 30 rounds, so A = r − V measured the value net's error rather than the sample's quality. The
value network's text input is the diffusion model's own pooled text embedding (for SD 1.x the same
CLIP ViT-L/14 text tower the official code loads separately, without its projection) rather than a second CLIP.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffrl.errors import UserInputError
from diffrl.metrics import metrics_to_floats, reward_metrics
from diffrl.policy_gradient import clamped_ratio_loss, epsilon_kl, ppo_clipped_loss
from diffrl.trainers.ppo import require_stochastic, rollout
from rewards import Reward

if TYPE_CHECKING:
    from diffrl.optimization import Optimization
    from diffrl.sampler import SDSampler
    from diffrl.trajectory import Trajectory


@dataclass
class DpokConfig:
    reward_weight: float = 10.0            # α of the policy-gradient term (official README: 10 single prompt, 1000
    #                                        many; train_online_pg.py's argparse default is 100)
    kl_weight: float = 0.01                # β, weight of mean((ε̂_θ − ε̂_ref)²) (official: 0.01 single, 0.1 many)
    kl_warmup: int = 0                     # rounds at the start without the KL term (official: none)
    clip_range: float = 1e-4               # ε of the ratio clamp (official: 1e-4)
    surrogate: Literal["clamp", "ppo"] = "clamp"  # clamp: official −A·clamp(ρ); ppo: PPO's max(−Aρ, −A·clip(ρ))
    buffer_size: int = 1000                # transitions kept in the FIFO replay buffer (official: 1000)
    p_step: int = 5                        # policy optimiser steps per round (official: 5)
    p_batch_size: int = 2                  # transitions per policy micro-batch (official argparse: 2; README: 4)
    value_network: bool = True             # learn V as a baseline (official: on); off: A = r
    v_step: int = 5                        # value micro-batches per round, one value step (official: 5)
    v_batch_size: int = 256                # transitions per value micro-batch (official: 256)
    v_lr: float = 1e-4                     # AdamW learning rate of the value network (official: 1e-4)
    seed: int = 0                          # seed of the trainer's own draws (buffer sampling)


class DpokTrainer:
    """DPOK: KL-regularised policy gradient with a replay buffer and a learned value baseline."""

    backpropagates_through_sampling = False

    def __init__(self, config: DpokConfig, sampler: SDSampler, reward: Reward, optimization: Optimization, *,
                 run_dir: Path):
        require_stochastic(sampler, "DPOK")
        for name in ("buffer_size", "p_step", "p_batch_size", "v_step", "v_batch_size"):
            if getattr(config, name) < 1:
                raise UserInputError(f"dpok.{name} must be at least 1, got {getattr(config, name)}")
        if config.clip_range <= 0 or config.kl_weight < 0:
            raise UserInputError("dpok.clip_range must be positive and dpok.kl_weight non-negative")
        self.config, self.sampler, self.reward, self.optimization = config, sampler, reward, optimization
        self.generator = torch.Generator().manual_seed(config.seed)
        self.buffer = TransitionBuffer(config.buffer_size)
        self.round = 0
        self.value_net = self.value_optimizer = None
        if config.value_network:
            latent_size = math.prod(sampler.latent_shape(1))
            text_size = pooled_text_embeddings(sampler, [""]).shape[1]
            net = ValueNetwork(latent_size, text_size,
                               sampler.num_steps).to(sampler.device)
            self.value_net = optimization.accelerator.prepare_model(net)
            self.value_optimizer = torch.optim.AdamW(net.parameters(), lr=config.v_lr)

    @staticmethod
    def optimizer_steps_per_step(config) -> float:   # config: the run's diffrl.config.Config
        return float(config.dpok.p_step)

    def step(self, prompts: list[str]) -> dict[str, float]:
        traj, rewards, components = rollout(self.sampler, self.reward, prompts)               # step 1
        self.buffer.add(traj, rewards, pooled_text_embeddings(self.sampler, prompts),
                        self.sampler.stochastic_steps)
        metrics = reward_metrics(rewards, components)
        if self.value_net is not None:
            metrics["value_loss"] = self._train_value()  # step 2; in units of the reward variance (1 = the mean's)
        metrics.update(self._train_policy())                                                   # step 3
        metrics["buffer_transitions"] = float(len(self.buffer))
        self.round += 1
        return metrics_to_floats(metrics)

    def _reward_standardisation(self) -> tuple[Tensor, Tensor]:
        """The buffer's reward mean and std (std 1 when all rewards are equal), a function of the buffer alone."""
        rewards = self.buffer.rewards
        std = rewards.std(correction=0)
        return rewards.mean(), torch.where(std > 0, std, torch.ones_like(std))

    @torch.no_grad()
    def baseline(self, rows: Tensor) -> Tensor:
        """V(x_t) of these buffer transitions in reward units: mean + std · V_net."""
        mean, std = self._reward_standardisation()
        buffer = self.buffer
        return mean + std * self.value_net(buffer.latents[rows], buffer.text_embeds[rows], buffer.steps[rows])

    def _train_value(self) -> Tensor:
        mean, std = self._reward_standardisation()
        losses = []
        for micro_batch in range(self.config.v_step):
            rows = self.buffer.random_rows(self.config.v_batch_size, self.generator)
            # Under DDP the value gradients are averaged across processes once, at the last micro-batch.
            last = micro_batch == self.config.v_step - 1
            with contextlib.nullcontext() if last else self.optimization.accelerator.no_sync(self.value_net):
                predicted = self.value_net(self.buffer.latents[rows], self.buffer.text_embeds[rows],
                                           self.buffer.steps[rows])
                loss = F.mse_loss(predicted, (self.buffer.rewards[rows] - mean) / std)
                (loss / self.config.v_step).backward()
            losses.append(loss.detach())
        self.value_optimizer.step()
        self.value_optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).mean()

    def _train_policy(self) -> dict[str, Tensor]:
        micro_batches = self.config.p_step * self.optimization.micro_batches_per_step
        parts = [self._policy_micro_batch() for _ in range(micro_batches)]
        metrics = {name: torch.stack([part[name] for part in parts]).mean() for name in parts[0] if name != "grad_norm"}
        grad_norms = [torch.as_tensor(part["grad_norm"]).float() for part in parts if "grad_norm" in part]
        if grad_norms:
            metrics["grad_norm"] = torch.stack(grad_norms).mean()
        return metrics

    def _policy_micro_batch(self) -> dict[str, Tensor]:
        rows = self.buffer.random_rows(self.config.p_batch_size, self.generator)
        with self.optimization.accumulate():
            loss, part = self.policy_loss(rows)
            grad_norm = self.optimization.step(loss)
        if grad_norm is not None:
            part["grad_norm"] = grad_norm
        return part

    def policy_loss(self, rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """−α · surrogate(ρ, A) + β · mean((ε̂_θ − ε̂_ref)²) on these buffer transitions, and its parts for logging."""
        config, sampler, buffer = self.config, self.sampler, self.buffer
        latents, steps = buffer.latents[rows], buffer.steps[rows]
        embeds, negative = sampler.encode_prompts([buffer.prompts[row] for row in rows.tolist()])
        log_probs, step = sampler.transition_log_prob(latents, buffer.next_latents[rows], steps, embeds, negative)
        with torch.no_grad():
            reference = sampler.step(latents, steps, embeds, negative, reference=True, add_noise=False).noise_pred
            advantages = buffer.rewards[rows]
            if self.value_net is not None:
                advantages = advantages - self.baseline(rows)
        surrogate = clamped_ratio_loss if config.surrogate == "clamp" else ppo_clipped_loss
        policy_loss, stats = surrogate(log_probs, buffer.log_probs[rows], advantages, config.clip_range)
        kl = epsilon_kl(step.noise_pred, reference)
        kl_weight = config.kl_weight if self.round >= config.kl_warmup else 0.0
        loss = config.reward_weight * policy_loss + kl_weight * kl
        ratio = (log_probs.detach() - buffer.log_probs[rows]).exp()
        return loss, {"loss": loss.detach(), "kl": kl.detach(), "ratio": ratio.mean(), "approx_kl": stats.approx_kl,
                      "clip_fraction": stats.clip_fraction}

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state(), "round": self.round, "buffer": self.buffer.state_dict()}
        if self.value_net is not None:
            state["value_net"] = self.optimization.accelerator.unwrap_model(self.value_net).state_dict()
            state["value_optimizer"] = self.value_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.round = state["round"]
        self.buffer.load_state_dict(state["buffer"], self.sampler.device)
        if self.value_net is not None:
            self.optimization.accelerator.unwrap_model(self.value_net).load_state_dict(state["value_net"])
            self.value_optimizer.load_state_dict(state["value_optimizer"])


class TransitionBuffer:
    """DPOK's FIFO replay buffer of single denoising transitions; the oldest are dropped beyond `capacity`."""

    TENSORS = ("latents", "next_latents", "steps", "log_probs", "rewards", "text_embeds")
    FORMER_NAMES = {"latents": "states", "next_latents": "next_states"}   # their keys in checkpoints written before December 2026

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.prompts: list[str] = []
        self.latents = self.next_latents = self.steps = self.log_probs = self.rewards = self.text_embeds = None

    def __len__(self) -> int:
        return len(self.prompts)

    def add(self, traj: Trajectory, rewards: Tensor, text_embeds: Tensor, steps: list[int]) -> None:
        """The batch's transitions at ``steps`` (the sampler's stochastic steps: a step with σ = 0 has no density),
        step-major (all of the first step, then the next, ...), as the official code adds every step."""
        batch, num_steps = len(traj), len(steps)
        index = torch.tensor(steps, device=traj.latents.device)
        new = {
            "latents": traj.latents[:, index].transpose(0, 1).flatten(0, 1),
            "next_latents": traj.latents[:, index + 1].transpose(0, 1).flatten(0, 1),
            "steps": index.repeat_interleave(batch),
            "log_probs": traj.log_probs[:, index].transpose(0, 1).flatten(),
            "rewards": rewards.float().repeat(num_steps),
            "text_embeds": text_embeds.float().repeat(num_steps, 1),
        }
        for name, values in new.items():
            old = getattr(self, name)
            setattr(self, name, (values if old is None else torch.cat([old, values]))[-self.capacity:])
        self.prompts = (self.prompts + list(traj.prompts) * num_steps)[-self.capacity:]

    def random_rows(self, count: int, generator: torch.Generator) -> Tensor:
        """`count` distinct rows (all of them if the buffer holds fewer), on the buffer's device."""
        return torch.randperm(len(self), generator=generator)[:count].to(self.latents.device)

    def state_dict(self) -> dict:
        return {"prompts": list(self.prompts), **{name: getattr(self, name) for name in self.TENSORS}}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """The capacity stays the config's (older checkpoints also hold a "capacity", which is ignored)."""
        self.prompts = list(state["prompts"])
        for name in self.TENSORS:
            value = state[name] if name in state else state[self.FORMER_NAMES[name]]
            setattr(self, name, None if value is None else value.to(device))


class StepConditionedLinear(nn.Module):
    """A linear layer whose outputs are scaled by a learned vector per denoising step (DPOK's value-net layer)."""

    def __init__(self, in_features: int, out_features: int, num_steps: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.step_scale = nn.Embedding(num_steps, out_features)
        nn.init.xavier_normal_(self.linear.weight)
        nn.init.uniform_(self.step_scale.weight)

    def forward(self, x: Tensor, steps: Tensor) -> Tensor:
        return self.linear(x) * self.step_scale(steps)


class ValueNetwork(nn.Module):
    """V(x_t, text embedding, step) ≈ E[r | x_t]: three step-conditioned ReLU layers of 256 units and a linear head,
    on the flattened latent concatenated with the text embedding (the official ValueMulti's shape)."""

    def __init__(self, latent_features: int, text_features: int, num_steps: int, hidden: int = 256):
        super().__init__()
        self.layers = nn.ModuleList([StepConditionedLinear(latent_features + text_features, hidden, num_steps),
                                     StepConditionedLinear(hidden, hidden, num_steps),
                                     StepConditionedLinear(hidden, hidden, num_steps)])
        self.head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.head.weight)  # V_net = 0: the baseline starts at the buffer's mean reward
        nn.init.zeros_(self.head.bias)

    def forward(self, latents: Tensor, text_embeds: Tensor, steps: Tensor) -> Tensor:
        with torch.autocast(latents.device.type, enabled=False):  # a small net: float32 keeps its regression exact
            flat = latents.flatten(1).float()
            # Unit RMS per sample: SD's scaled latents already have RMS ≈ 1, so this is nearly the identity there,
            # but it keeps the regression well-conditioned for VAEs whose latents are on another scale.
            flat = flat * torch.rsqrt(flat.pow(2).mean(dim=1, keepdim=True) + 1e-6)
            x = torch.cat([flat, text_embeds.float()], dim=1)
            for layer in self.layers:
                x = F.relu(layer(x, steps))
            return self.head(x).squeeze(1)


@torch.no_grad()
def pooled_text_embeddings(sampler: SDSampler, prompts: list[str]) -> Tensor:
    """The value network's view of each prompt, [B, D] float32: the CLIP text encoder's pooled output, as the official
    DPOK code uses it (SD 1.x/2.x, SDXL, FLUX; SD3's projected pooled text). A family whose text encoder has no pooled
    output (Z-Image's Qwen3 decoder) gives the mean of its conditioning's text features over the prompt's own tokens
    (diffrl's choice: a fixed-size summary of what the denoiser reads)."""
    pipe = sampler.pipe
    if not type(pipe.text_encoder).__name__.startswith("CLIPTextModel"):
        conditioning = sampler.encode_prompts(list(prompts))[0]
        embeds = conditioning.prompt_embeds.float()
        mask = getattr(conditioning, "prompt_mask", None)
        mask = torch.ones(embeds.shape[:2], device=embeds.device) if mask is None else mask.float()
        return (embeds * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    tokens = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    output = pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))
    # CLIPTextModel (SD 1.x/2.x, SDXL, FLUX) pools; CLIPTextModelWithProjection (SD3) gives the projected pooled text
    pooled = output.pooler_output if hasattr(output, "pooler_output") else output.text_embeds
    return pooled.float()
