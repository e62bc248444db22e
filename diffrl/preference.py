"""Pure math of the preference trainers: the Diffusion-DPO loss form (SPIN-Diffusion, offline PSO) and online PSO's
loss on per-step likelihood ratios.

Diffusion-DPO (Wallace et al., CVPR 2024, arXiv 2311.12908, eq. 14) scores a pair (winner w, loser l), both noised
with the same ε to the same timestep t, by how much better the policy denoises the winner than the reference does,
compared with the same difference on the loser:

    inside = −β · [(‖ε − ε_θ(x^w_t)‖² − ‖ε − ε_ref(x^w_t)‖²) − (‖ε − ε_θ(x^l_t)‖² − ‖ε − ε_ref(x^l_t)‖²)]
    loss   = −log σ(inside), averaged over pairs

Reduction next to β: each ‖·‖² is the MEAN over latent elements (as Diffusion-DPO's official code computes it), so β
is on the scale of the papers' 2000-5000. At θ = ref the inside is 0 and the loss is log 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def denoising_errors(noise: Tensor, noise_pred: Tensor) -> Tensor:
    """[B] ‖ε − ε̂‖² as the mean over every non-batch element, in float32."""
    return (noise.float() - noise_pred.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class PreferenceStats:
    accuracy: Tensor        # fraction of pairs with inside > 0 (the policy prefers the winner more than ref does)
    margin: Tensor          # mean of inside / β: the policy's error advantage on the winner over the loser


def diffusion_dpo_loss(policy_winner: Tensor, policy_loser: Tensor, reference_winner: Tensor, reference_loser: Tensor,
                       beta: float) -> tuple[Tensor, PreferenceStats]:
    """The Diffusion-DPO loss from four [B] tensors of denoising errors (see ``denoising_errors``); the reference
    errors carry no gradient. Lower policy error on the winner than the reference's lowers the loss."""
    winner_gain = policy_winner.float() - reference_winner.detach().float()
    loser_gain = policy_loser.float() - reference_loser.detach().float()
    margin = -(winner_gain - loser_gain)
    inside = beta * margin
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        stats = PreferenceStats(accuracy=(inside > 0).float().mean(), margin=margin.mean())
    return loss, stats


def pso_online_loss(log_ratios_a: Tensor, log_ratios_b: Tensor, rewards_a: Tensor, rewards_b: Tensor, beta: float,
                    ratio_clamp: tuple[float, float] = (0.9, 1.1)) -> tuple[Tensor, PreferenceStats]:
    """Online PSO (Miao et al., ICLR 2025, arXiv 2410.03190) on two trajectories per prompt.

    ``log_ratios_*`` are [B, S]: log p_θ − log p_ref of each of the S stochastic student steps (log-probs averaged
    over latent elements); the reward ranks each pair into winner and loser. Per step,
        r = clamp(p_θ / p_ref, lo, hi),   loss_s = −log σ(β · (log r_win − log r_lose)),
    so a ratio outside the clamp gives no gradient. The loss is the mean over steps and pairs; a tied pair counts as
    zero (no gradient) in that mean.
    """
    low, high = ratio_clamp
    a_wins = (rewards_a > rewards_b).unsqueeze(1)
    tied = rewards_a == rewards_b
    # clamp in log space: log clamp(ρ) = clamp(log ρ), with the same zero gradient outside the range
    log_r_a = log_ratios_a.float().clamp(math.log(low), math.log(high))
    log_r_b = log_ratios_b.float().clamp(math.log(low), math.log(high))
    margin = torch.where(a_wins, log_r_a - log_r_b, log_r_b - log_r_a)
    per_step = -F.logsigmoid(beta * margin)
    loss = torch.where(tied.unsqueeze(1), torch.zeros_like(per_step), per_step).mean()
    with torch.no_grad():
        decided = (~tied).float()   # no Python branch on a tensor: this runs every step, without a host read
        preferred = (margin.mean(dim=1) > 0).float() * decided
        stats = PreferenceStats(accuracy=preferred.sum() / decided.sum().clamp_min(1), margin=margin.mean())
    return loss, stats
