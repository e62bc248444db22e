"""Pure math of the preference trainers (SPIN-Diffusion, PSO offline): the Diffusion-DPO loss form.

Diffusion-DPO (Wallace et al., CVPR 2024, arXiv 2311.12908, eq. 14) scores a pair (winner w, loser l), both noised
with the same ε to the same timestep t, by how much better the policy denoises the winner than the reference does,
compared with the same difference on the loser:

    inside = −β · [(‖ε − ε_θ(x^w_t)‖² − ‖ε − ε_ref(x^w_t)‖²) − (‖ε − ε_θ(x^l_t)‖² − ‖ε − ε_ref(x^l_t)‖²)]
    loss   = −log σ(inside), averaged over pairs

Reduction next to β: each ‖·‖² is the MEAN over latent elements (as Diffusion-DPO's official code computes it), so β
is on the scale of the papers' 2000-5000. At θ = ref the inside is 0 and the loss is log 2.
"""

from __future__ import annotations

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
