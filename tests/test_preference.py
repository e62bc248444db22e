"""The Diffusion-DPO and offline PSO loss forms, and online PSO's, against numbers worked by hand in the official
codes' own expressions."""

from __future__ import annotations

import math

import torch

from diffrl.preference import denoising_errors, diffusion_dpo_loss, pso_offline_loss, pso_online_loss


def test_denoising_errors_are_the_mean_square_over_elements():
    noise = torch.zeros(2, 1, 2, 2)
    prediction = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    assert denoising_errors(noise, prediction).tolist() == [1.0, 1.0]   # 4/4 and 4/4


def test_policy_equal_to_reference_gives_log_two():
    errors = torch.tensor([0.3, 0.7])
    loss, stats = diffusion_dpo_loss(errors, errors + 0.1, errors, errors + 0.1, beta=5000.0)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert stats.accuracy.item() == 0.0 and stats.margin.item() == 0.0


# winner: policy 0.10 vs reference 0.12 (better by 0.02); loser: policy 0.20 vs reference 0.19 (worse by 0.01).
# In float32 each input carries ≤ 6e-8 relative rounding, so the margin 0.03 (a difference of ~0.1 numbers) is off by
# up to ~1e-6 relative, and so are the losses below: rel_tol 1e-5. The ½ the official form has changes them by 4×.
PAIR = (torch.tensor([0.10]), torch.tensor([0.20]), torch.tensor([0.12]), torch.tensor([0.19]))


def test_diffusion_dpo_matches_the_official_expression_with_its_half():
    """SalesforceAIResearch/DiffusionDPO train.py: model_diff = 0.10 − 0.20 = −0.10, ref_diff = 0.12 − 0.19 = −0.07,
    inside = −0.5 β (model_diff − ref_diff) = 0.015 β; β = 100 gives 1.5 and loss log(1 + e^−1.5) = 0.201413.
    (Without the ½, the form diffrl had before, the loss would be log(1 + e^−3) = 0.048587.)"""
    for beta, expected in ((100.0, 0.2014132779827524), (10.0, math.log1p(math.exp(-0.15)))):
        loss, stats = diffusion_dpo_loss(*PAIR, beta=beta)
        assert math.isclose(loss.item(), expected, rel_tol=1e-5), (beta, loss.item(), expected)
        assert stats.accuracy.item() == 1.0 and math.isclose(stats.margin.item(), 0.03, rel_tol=1e-5)
    # the sign convention: the same numbers with winner and loser swapped are a worse (higher) loss
    swapped, _ = diffusion_dpo_loss(PAIR[1], PAIR[0], PAIR[3], PAIR[2], beta=10.0)
    assert swapped.item() > diffusion_dpo_loss(*PAIR, beta=10.0)[0].item()


def test_offline_pso_matches_the_official_expression_without_a_half():
    """ZichenMiao/Pairwise_Sample_Optimization (loss_type "pso"), neg_defactor λ = 0.1, β = 100:
    model_diff = 0.10 − 0.1·0.20 = 0.08, ref_diff = 0.12 − 0.1·0.19 = 0.101, logits = ref_diff − model_diff = 0.021,
    loss = −log σ(100 · 0.021) = log(1 + e^−2.1) = 0.115520."""
    loss, stats = pso_offline_loss(*PAIR, beta=100.0, loser_weight=0.1)
    assert math.isclose(loss.item(), 0.1155195232, rel_tol=1e-5), loss.item()
    assert stats.accuracy.item() == 1.0 and math.isclose(stats.margin.item(), 0.021, rel_tol=1e-5)
    # with λ = 1 the two forms differ only by the ½: PSO's β is Diffusion-DPO's β / 2
    assert math.isclose(pso_offline_loss(*PAIR, beta=50.0, loser_weight=1.0)[0].item(),
                        diffusion_dpo_loss(*PAIR, beta=100.0)[0].item(), rel_tol=1e-5)


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
