"""Policy-gradient math against hand-worked examples (the numbers are worked in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from diffrl.policy_gradient import (PerPromptStatTracker, clamped_ratio_loss, group_advantages,
                                    leave_one_out_advantages, nonzero_groups, ppo_clipped_loss)

LOG2 = math.log(2.0)


def test_ppo_clipped_loss_by_hand():
    # ratios ρ = [2, 1, 0.5], A = [1, −1, −2], ε = 0.2
    #   ρ=2,   A=1:  −Aρ = −2,  −A·clip = −1.2  -> max −1.2 (clipped: no gradient)
    #   ρ=1,   A=−1: −Aρ = 1,   −A·clip = 1     -> 1        (gradient −A·ρ = 1, /3 for the mean)
    #   ρ=0.5, A=−2: −Aρ = 1,   −A·clip = 1.6   -> 1.6      (clipped: no gradient)
    # loss = (−1.2 + 1 + 1.6) / 3 = 0.46667; approx KL = ½ (ln²2 + 0 + ln²2) / 3; clip fraction 2/3
    old = torch.zeros(3)
    log_probs = torch.tensor([LOG2, 0.0, -LOG2], requires_grad=True)
    loss, stats = ppo_clipped_loss(log_probs, old, torch.tensor([1.0, -1.0, -2.0]), clip_range=0.2)
    torch.testing.assert_close(loss, torch.tensor(1.4 / 3))
    torch.testing.assert_close(stats.approx_kl, torch.tensor(LOG2**2 / 3))
    torch.testing.assert_close(stats.clip_fraction, torch.tensor(2 / 3))
    loss.backward()
    torch.testing.assert_close(log_probs.grad, torch.tensor([0.0, 1 / 3, 0.0]))


def test_ppo_keeps_the_gradient_where_clamping_alone_would_drop_it():
    # ρ = 0.5, A = +1, ε = 0.2: PPO takes max(−0.5, −0.8) = −0.5, the unclipped term, whose gradient is −Aρ = −0.5;
    # DPOK's clamp gives −0.8 with no gradient.
    log_probs = torch.tensor([-LOG2], requires_grad=True)
    ppo, _ = ppo_clipped_loss(log_probs, torch.zeros(1), torch.ones(1), 0.2)
    ppo.backward()
    torch.testing.assert_close(ppo, torch.tensor(-0.5))
    torch.testing.assert_close(log_probs.grad, torch.tensor([-0.5]))
    log_probs.grad = None
    clamped, _ = clamped_ratio_loss(log_probs, torch.zeros(1), torch.ones(1), 0.2)
    clamped.backward()
    torch.testing.assert_close(clamped, torch.tensor(-0.8))
    torch.testing.assert_close(log_probs.grad, torch.tensor([0.0]))


def test_ratio_one_gives_the_plain_policy_gradient():
    # At ρ = 1 (before any update) d loss / d log p = −A / n for both surrogates.
    advantages = torch.tensor([0.5, -2.0, 3.0, 0.0])
    for surrogate in (ppo_clipped_loss, clamped_ratio_loss):
        log_probs = torch.zeros(4, requires_grad=True)
        loss, stats = surrogate(log_probs, torch.zeros(4), advantages, 1e-4)
        loss.backward()
        torch.testing.assert_close(log_probs.grad, -advantages / 4)
        assert stats.clip_fraction == 0 and stats.approx_kl == 0


def test_leave_one_out_by_hand():
    # group [1, 2, 6]: others' means 4, 3.5, 1.5 -> A = [−3, −1.5, 4.5]; group [5, 5]: A = [0, 0]
    rewards = torch.tensor([[1.0, 2.0, 6.0]])
    torch.testing.assert_close(leave_one_out_advantages(rewards), torch.tensor([[-3.0, -1.5, 4.5]]))
    torch.testing.assert_close(leave_one_out_advantages(torch.tensor([[5.0, 5.0]])), torch.zeros(1, 2))
    # with std normalisation: sample std of [1, 2, 6] = √7 = 2.6458
    normalized = leave_one_out_advantages(rewards, normalize_std=True)
    torch.testing.assert_close(normalized, torch.tensor([[-3.0, -1.5, 4.5]]) / (7**0.5 + 1e-6))
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_advantages(torch.ones(3, 1))


def test_per_prompt_tracker_by_hand():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2, eps=0.0)
    # batch 1: a gets [1, 3] (2 ≥ min_count: its own mean 2, std 1 -> −1, 1);
    #          b gets [10] (1 < min_count: batch mean 14/3, population std √(134/9 − ...) = 3.8586 -> 1.3822)
    first = tracker.advantages(["a", "a", "b"], torch.tensor([1.0, 3.0, 10.0]))
    batch_std = torch.tensor([1.0, 3.0, 10.0]).std(correction=0)
    torch.testing.assert_close(first, torch.tensor([-1.0, 1.0, (10 - 14 / 3) / batch_std.item()]))
    # batch 2: a's buffer keeps its last 3 of [1, 3, 5, 7] = [3, 5, 7]: mean 5, std √(8/3) -> [0, 2/√(8/3)]
    state = tracker.state_dict()
    second = tracker.advantages(["a", "a"], torch.tensor([5.0, 7.0]))
    torch.testing.assert_close(second, torch.tensor([0.0, 2.0 / (8 / 3) ** 0.5]))
    restored = PerPromptStatTracker(buffer_size=3, min_count=2, eps=0.0)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.advantages(["a", "a"], torch.tensor([5.0, 7.0])), second)


def test_dpok_clamp_has_no_policy_gradient_outside_the_clip_range():
    # ε = 0.1: ρ = e^{±0.2} lies outside [0.9, 1.1] for either sign of A, so the clamp is constant there: loss
    # −A·(1 ± ε) and zero gradient; ρ = e^{0.05} is inside: gradient −A·ρ/n.
    log_ratios = torch.tensor([0.2, 0.2, -0.2, -0.2, 0.05])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    log_probs = log_ratios.clone().requires_grad_(True)
    loss, stats = clamped_ratio_loss(log_probs, torch.zeros(5), advantages, clip_range=0.1)
    loss.backward()
    inside = math.exp(0.05)
    torch.testing.assert_close(loss, torch.tensor((-1.1 + 1.1 - 0.9 + 0.9 - 2 * inside) / 5))
    torch.testing.assert_close(log_probs.grad, torch.tensor([0.0, 0.0, 0.0, 0.0, -2 * inside / 5]))
    torch.testing.assert_close(stats.clip_fraction, torch.tensor(0.8))


def test_group_advantages_match_a_hand_worked_table():
    # group "a": rewards 1, 3 -> mean 2, population std 1; group "b": 5, 5, 5 -> std 0; group "c": 0, 4 -> mean 2, std 2
    prompts = ["a", "b", "a", "c", "b", "b", "c"]
    rewards = torch.tensor([1.0, 5.0, 3.0, 0.0, 5.0, 5.0, 4.0])
    eps = 1e-4
    expected = torch.tensor([-1 / (1 + eps), 0.0, 1 / (1 + eps), -2 / (2 + eps), 0.0, 0.0, 2 / (2 + eps)])
    advantages = group_advantages(prompts, rewards)
    assert advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, expected, rtol=1e-6, atol=0)
    assert nonzero_groups(advantages).tolist() == [True, False, True, True, False, False, True]


def test_group_advantages_with_the_global_std():
    prompts = ["a", "b", "a", "b"]
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # batch mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5
    std = 3.5 ** 0.5 + 1e-4
    expected = torch.tensor([-1.0, -2.0, 1.0, 2.0]) / std
    torch.testing.assert_close(group_advantages(prompts, rewards, global_std=True), expected, rtol=1e-6, atol=0)
