"""Pure math shared by the policy-gradient trainers (DDPO, LOOP, DPOK, GRPO, NFT): surrogates and advantages.

Notation (paper -> code):
    ρ = p_θ(x_{t'}|x_t) / p_old(x_{t'}|x_t)   ratio         exp(log_probs − old_log_probs), per-step log-probs as
                                                            stored in Trajectory.log_probs (mean over elements)
    A                                         advantages    one per trajectory, shared by all its steps
    ε                                         clip_range    PPO's trust region (DDPO/DPOK: 1e-4)
All functions take and return tensors; none holds state except PerPromptStatTracker, whose state_dict makes it
resumable.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SurrogateStats:
    approx_kl: Tensor      # ½ mean (log ρ)², DDPO's estimate of KL(old ‖ θ) for small steps
    clip_fraction: Tensor  # fraction of samples with |ρ − 1| > ε


def ppo_clipped_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_range: float
                     ) -> tuple[Tensor, SurrogateStats]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as DDPO uses it (Black et al. 2023, §4.3):

        loss = mean( max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε)) )
    """
    log_ratio = log_probs.float() - old_log_probs.float()
    ratio = torch.exp(log_ratio)
    advantages = advantages.float()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), _stats(log_ratio, ratio, clip_range)


def clamped_ratio_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_range: float
                       ) -> tuple[Tensor, SurrogateStats]:
    """DPOK's official surrogate (google-research/dpok): mean(−A clamp(ρ, 1 − ε, 1 + ε)), a clamp without PPO's max.

    Unlike PPO it also stops the gradient when the ratio has moved the "good" way past the clip range.
    """
    log_ratio = log_probs.float() - old_log_probs.float()
    ratio = torch.exp(log_ratio)
    loss = (-advantages.float() * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)).mean()
    return loss, _stats(log_ratio, ratio, clip_range)


def _stats(log_ratio: Tensor, ratio: Tensor, clip_range: float) -> SurrogateStats:
    with torch.no_grad():
        return SurrogateStats(approx_kl=0.5 * (log_ratio**2).mean(),
                              clip_fraction=((ratio - 1.0).abs() > clip_range).float().mean())


def epsilon_kl(noise_pred: Tensor, reference_noise_pred: Tensor) -> Tensor:
    """mean((ε̂_θ − ε̂_ref)²): the KL regulariser of DPOK (and DRaFT+) in noise space.

    For one Gaussian step with shared σ the KL is ‖μ_θ − μ_ref‖² / 2σ², and μ is affine in ε̂, so this is that KL up
    to a per-step factor; the official DPOK code uses exactly this mean over all elements.
    """
    return ((noise_pred.float() - reference_noise_pred.float()) ** 2).mean()


def leave_one_out_advantages(rewards: Tensor, normalize_std: bool = False, eps: float = 1e-6) -> Tensor:
    """LOOP (Gupta et al. 2025): A_i = R_i − mean_{j≠i} R_j within each group of k samples of one prompt.

    ``rewards`` is [G, k] (G prompts, k ≥ 2 samples each); the result has the same shape. Algebraically
    A_i = k/(k−1) · (R_i − mean_j R_j). ``normalize_std`` also divides by the group's std (unverified in the paper).
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"leave-one-out needs at least 2 samples per prompt, got {k}")
    rewards = rewards.float()
    others_mean = (rewards.sum(dim=-1, keepdim=True) - rewards) / (k - 1)
    advantages = rewards - others_mean
    if normalize_std:
        advantages = advantages / (rewards.std(dim=-1, keepdim=True) + eps)
    return advantages


def group_advantages(prompts: list[str], rewards: Tensor, *, global_std: bool = False, eps: float = 1e-4) -> Tensor:
    """Flow-GRPO's group-relative advantages (Liu et al. 2025, eq. 4; official flow_grpo/stat_tracking.py at
    ac4c86e, lines 17-31): Â_i = (R_i − mean of its group) / (std + eps), a group being the samples of one prompt text
    in this batch. The std is the group's own, or with ``global_std`` the whole batch's (the official option); both
    are population stds (numpy's default), eps = 1e-4 as in the official code. A group whose rewards are all equal
    gets Â = 0 (its samples carry no signal: see ``nonzero_groups``). Call it on the batch gathered from every
    process so that groups split across processes are whole. Computed in float64 like the official numpy code."""
    values = rewards.detach().double().cpu()
    if len(prompts) != len(values):
        raise ValueError(f"{len(prompts)} prompts for {len(values)} rewards")
    rows_of: dict[str, list[int]] = {}
    for row, prompt in enumerate(prompts):
        rows_of.setdefault(prompt, []).append(row)
    batch_std = values.std(correction=0)
    out = torch.empty_like(values)
    for rows in rows_of.values():
        group = values[rows]
        std = batch_std if global_std else group.std(correction=0)
        out[rows] = (group - group.mean()) / (std + eps)
    return out.to(device=rewards.device, dtype=torch.float32)


def nonzero_groups(advantages: Tensor) -> Tensor:
    """[N] bool: the samples whose advantage is not exactly zero. Flow-GRPO trains only on these (official
    scripts/train_sd3.py at ac4c86e, lines 796-817): a group of identical rewards has only zero advantages."""
    return advantages != 0


class PerPromptStatTracker:
    """DDPO's per-prompt reward normalisation: A = (r − mean_p) / (std_p + eps).

    Each prompt keeps its last ``buffer_size`` rewards; until it holds ``min_count`` of them the whole batch's mean and
    std stand in (DDPO: buffer 16, min_count 16). Rewards of a prompt are added before its statistics are taken, as in
    DDPO. With several processes, call it on the gathered batch so that every process sees the same statistics.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6):
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.buffers: dict[str, deque[float]] = {}

    def advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        values = rewards.detach().float().cpu()
        batch_mean, batch_std = values.mean(), values.std(correction=0)
        out = torch.empty_like(values)
        rows_of: dict[str, list[int]] = {}
        for row, prompt in enumerate(prompts):
            rows_of.setdefault(prompt, []).append(row)
        for prompt, rows in rows_of.items():
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                history = torch.tensor(list(buffer))
                mean, std = history.mean(), history.std(correction=0)
            out[rows] = (values[rows] - mean) / (std + self.eps)
        return out.to(rewards.device)

    def state_dict(self) -> dict:
        return {"buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state["buffers"].items()}
