"""The Diffusion-DPO loss form against numbers worked by hand."""

from __future__ import annotations

import math

import torch

from diffrl.preference import denoising_errors, diffusion_dpo_loss, pso_online_loss


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


def _softplus(x: float) -> float:
    return math.log1p(math.exp(-x))   # -log sigmoid(x)


def test_online_pso_hand_worked_with_clamped_ratios():
    """One pair, two steps; b has the higher reward, so b wins. β = 10, clamp [0.9, 1.1].
    step 0: log r_a = 0.02, log r_b = 0.05 -> margin 0.03
    step 1: log r_a = -0.5 (clamped to log 0.9), log r_b = 0.3 (clamped to log 1.1) -> margin log(1.1/0.9)"""
    log_a = torch.tensor([[0.02, -0.5]], requires_grad=True)
    log_b = torch.tensor([[0.05, 0.3]], requires_grad=True)
    loss, stats = pso_online_loss(log_a, log_b, torch.tensor([0.1]), torch.tensor([0.7]), beta=10.0)
    clamped = math.log(1.1) - math.log(0.9)
    expected = (_softplus(10 * 0.03) + _softplus(10 * clamped)) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6), (loss.item(), expected)
    assert stats.accuracy.item() == 1.0
    loss.backward()
    # d/d log r_b at step 0 = -β σ(-β·0.03) / 2 (mean over 2 steps); the clamped step 1 gets no gradient
    sigma = 1 / (1 + math.exp(10 * 0.03))
    torch.testing.assert_close(log_b.grad, torch.tensor([[-10 * sigma / 2, 0.0]]))
    torch.testing.assert_close(log_a.grad, torch.tensor([[10 * sigma / 2, 0.0]]))


def test_online_pso_tie_gives_no_gradient_and_the_winner_follows_the_reward():
    log_a = torch.tensor([[0.01, 0.02], [0.03, -0.01]], requires_grad=True)
    log_b = torch.tensor([[0.00, 0.01], [0.02, 0.00]], requires_grad=True)
    loss, _ = pso_online_loss(log_a, log_b, torch.tensor([0.5, 0.9]), torch.tensor([0.5, 0.2]), beta=50.0)
    loss.backward()
    assert log_a.grad[0].abs().sum() == 0 and log_b.grad[0].abs().sum() == 0   # pair 0 is a tie
    assert (log_a.grad[1] < 0).all() and (log_b.grad[1] > 0).all()             # a won: its ratio is pushed up
    # swapping the rewards swaps the roles: the same loss with the winner's ratios pushed the other way
    swapped, _ = pso_online_loss(log_b.detach(), log_a.detach(), torch.tensor([0.5, 0.2]), torch.tensor([0.5, 0.9]),
                                 beta=50.0)
    assert math.isclose(swapped.item(), loss.item(), rel_tol=1e-6)
