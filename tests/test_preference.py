"""The Diffusion-DPO loss form against numbers worked by hand."""

from __future__ import annotations

import math

import torch

from diffrl.preference import denoising_errors, diffusion_dpo_loss


def test_denoising_errors_are_the_mean_square_over_elements():
    noise = torch.zeros(2, 1, 2, 2)
    prediction = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    assert denoising_errors(noise, prediction).tolist() == [1.0, 1.0]   # 4/4 and 4/4


def test_policy_equal_to_reference_gives_log_two():
    errors = torch.tensor([0.3, 0.7])
    loss, stats = diffusion_dpo_loss(errors, errors + 0.1, errors, errors + 0.1, beta=5000.0)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert stats.accuracy.item() == 0.0 and stats.margin.item() == 0.0


def test_hand_worked_pair_and_beta_scaling():
    # winner: policy 0.10 vs reference 0.12 (better by 0.02); loser: policy 0.20 vs reference 0.19 (worse by 0.01)
    # inside = -beta * ((0.10 - 0.12) - (0.20 - 0.19)) = beta * 0.03
    args = (torch.tensor([0.10]), torch.tensor([0.20]), torch.tensor([0.12]), torch.tensor([0.19]))
    for beta in (10.0, 100.0):
        loss, stats = diffusion_dpo_loss(*args, beta=beta)
        expected = math.log1p(math.exp(-beta * 0.03))          # -log sigmoid(x) = log(1 + e^-x)
        assert math.isclose(loss.item(), expected, rel_tol=1e-5), (beta, loss.item(), expected)
        assert stats.accuracy.item() == 1.0 and math.isclose(stats.margin.item(), 0.03, rel_tol=1e-5)
    # the sign convention: the same numbers with winner and loser swapped are a worse (higher) loss
    swapped, _ = diffusion_dpo_loss(args[1], args[0], args[3], args[2], beta=10.0)
    assert swapped.item() > diffusion_dpo_loss(*args, beta=10.0)[0].item()


def test_gradient_at_initialisation_lowers_winner_error_and_raises_loser_error():
    """At θ = ref, d loss / d policy_winner = β σ(0) / B > 0 and d loss / d policy_loser = −β σ(0) / B: gradient
    descent pushes the winner's error down and the loser's up. The reference gets no gradient."""
    beta, batch = 50.0, 2
    policy_winner = torch.tensor([0.4, 0.5], requires_grad=True)
    policy_loser = torch.tensor([0.6, 0.2], requires_grad=True)
    reference_winner = policy_winner.detach().clone().requires_grad_(True)
    reference_loser = policy_loser.detach().clone().requires_grad_(True)
    loss, _ = diffusion_dpo_loss(policy_winner, policy_loser, reference_winner, reference_loser, beta)
    loss.backward()
    torch.testing.assert_close(policy_winner.grad, torch.full((batch,), beta * 0.5 / batch))
    torch.testing.assert_close(policy_loser.grad, torch.full((batch,), -beta * 0.5 / batch))
    assert reference_winner.grad is None and reference_loser.grad is None
