"""Pure math of the preference trainers: the Diffusion-DPO loss (SPIN-Diffusion), offline PSO's loss of the same
family, and online PSO's loss on per-step likelihood ratios.

Both offline forms score a pair (winner w, loser l), both noised with the same ε to the same timestep t, by how much
better the policy denoises the winner than the reference does, compared with the same difference on the loser. With
e_θ(x) = ‖ε − ε_θ(x_t)‖² and e_ref(x) the reference's, each the MEAN over latent elements:

    Diffusion-DPO (Wallace et al., CVPR 2024, arXiv 2311.12908, eq. 14; official SalesforceAIResearch/DiffusionDPO,
    train.py lines 1121-1145 at commit 5233e75, `scale_term = -0.5 * args.beta_dpo` on line 1142):
        model_diff = e_θ(w) − e_θ(l),   ref_diff = e_ref(w) − e_ref(l)
        inside = −½ β (model_diff − ref_diff),   loss = −log σ(inside), averaged over pairs
    The ½ is the official code's `scale_term = -0.5 * beta_dpo`: with it, the papers' β (Diffusion-DPO 5000 for
    SD 1.5, SPIN-Diffusion 2000-5000) mean here what they mean there. At θ = ref the loss is log 2 and each
    pair's d loss / d e_θ(w) is β/4 (before the mean over pairs).

    Offline PSO (Miao et al., ICLR 2025, arXiv 2410.03190; official ZichenMiao/Pairwise_Sample_Optimization,
    personalization/train_pso_sdxl_turbo_dreambooth.py at commit 85e09df, lines 1839-1883, `loss_type == "pso"`):
        model_diff = e_θ(w) − λ e_θ(l),   ref_diff = e_ref(w) − λ e_ref(l)     (λ: the official `neg_defactor`)
        inside = β (ref_diff − model_diff),   loss = −log σ(inside)
    No ½: PSO's β = 100 is Diffusion-DPO's β = 200 when λ = 1. The official code's errors are EDM-style x0 errors
    weighted by σ⁻², which equal the ε errors used here, so its β applies unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def denoising_errors(target: Tensor, prediction: Tensor) -> Tensor:
    """[B] ‖target − prediction‖² as the mean over every non-batch element, in float32. The target is what the model
    family is trained to predict: ε for diffusion models (Diffusion-DPO's ‖ε − ε̂‖²), the velocity ε − x0 for
    flow-matching ones (the velocity-matching form Flow-DPO uses, Liu et al., arXiv 2501.13918; unverified against
    its code)."""
    return (target.float() - prediction.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class PreferenceStats:
    accuracy: Tensor        # fraction of pairs with inside > 0 (the policy prefers the winner more than ref does)
    margin: Tensor          # mean of ref_diff − model_diff: the policy's error advantage on the winner, β-free


def _pairwise_logistic_loss(model_diff: Tensor, ref_diff: Tensor, scale: float) -> tuple[Tensor, PreferenceStats]:
    """−log σ(scale · (ref_diff − model_diff)), averaged over pairs; the reference carries no gradient."""
    margin = ref_diff.detach().float() - model_diff.float()
    inside = scale * margin
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        stats = PreferenceStats(accuracy=(inside > 0).float().mean(), margin=margin.mean())
    return loss, stats


def diffusion_dpo_loss(policy_winner: Tensor, policy_loser: Tensor, reference_winner: Tensor, reference_loser: Tensor,
                       beta: float) -> tuple[Tensor, PreferenceStats]:
    """The Diffusion-DPO loss in the official form, −log σ(−½β (model_diff − ref_diff)), from four [B] tensors of
    denoising errors (see ``denoising_errors``). Lower policy error on the winner than the reference's lowers it."""
    return _pairwise_logistic_loss(policy_winner - policy_loser, reference_winner - reference_loser, 0.5 * beta)


def pso_offline_loss(policy_winner: Tensor, policy_loser: Tensor, reference_winner: Tensor, reference_loser: Tensor,
                     beta: float, loser_weight: float) -> tuple[Tensor, PreferenceStats]:
    """Offline PSO's loss as its official code writes it, −log σ(β (ref_diff − model_diff)) with each diff
    = winner error − loser_weight · loser error (no ½; see the module docstring)."""
    return _pairwise_logistic_loss(policy_winner - loser_weight * policy_loser,
                                   reference_winner - loser_weight * reference_loser, beta)


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
