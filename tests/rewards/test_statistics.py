"""rewards.statistics: values and gradients against hand computations."""

from __future__ import annotations

import pytest
import torch

from rewards.statistics import BrightnessReward, ContrastReward, SaturationReward

H = W = 8
N = H * W
WR, WG, WB = 0.299, 0.587, 0.114  # Rec.601 luma weights


def constant(*colours: tuple[float, float, float]) -> torch.Tensor:
    """A batch of flat images, one per colour."""
    return torch.tensor(colours, dtype=torch.float32)[:, :, None, None].expand(-1, 3, H, W).clone()


def split(left: tuple[float, float, float], right: tuple[float, float, float]) -> torch.Tensor:
    """One image whose left half is `left` and right half is `right`."""
    image = torch.empty(1, 3, H, W)
    image[..., : W // 2] = torch.tensor(left)[:, None, None]
    image[..., W // 2 :] = torch.tensor(right)[:, None, None]
    return image


def test_brightness_of_flat_colours_is_their_luma():
    images = constant((0.2, 0.4, 0.6), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0))
    expected = torch.tensor([WR * 0.2 + WG * 0.4 + WB * 0.6, WR, WB])   # 0.4456, 0.299, 0.114
    torch.testing.assert_close(BrightnessReward()(images, [""] * 3), expected)


def test_brightness_gradient_is_the_luma_weight_over_pixel_count():
    images = torch.rand(2, 3, H, W, requires_grad=True)
    BrightnessReward()(images, ["", ""]).sum().backward()
    expected = torch.tensor([WR, WG, WB])[None, :, None, None].expand(2, 3, H, W) / N
    torch.testing.assert_close(images.grad, expected)
    assert (images.grad > 0).all()


def test_saturation_is_mean_chroma():
    grey = constant((0.5, 0.5, 0.5))
    half_red = split((1.0, 0.0, 0.0), (0.3, 0.3, 0.3))   # chroma 1 on half the pixels, 0 on the rest
    images = torch.cat([constant((0.2, 0.4, 0.6)), grey, half_red])
    torch.testing.assert_close(SaturationReward()(images, [""] * 3), torch.tensor([0.4, 0.0, 0.5]))


def test_saturation_gradient_raises_max_and_lowers_min_channel():
    images = constant((0.2, 0.4, 0.6)).requires_grad_()
    SaturationReward()(images, [""]).sum().backward()
    # chroma = B - R here: +1/N on blue, -1/N on red, nothing on green
    expected = torch.tensor([-1.0, 0.0, 1.0])[None, :, None, None].expand(1, 3, H, W) / N
    torch.testing.assert_close(images.grad, expected)


def test_contrast_of_two_valued_image_is_half_the_luma_gap():
    black_white = split((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))     # luma 0 and 1: std 0.5
    red_blue = split((1.0, 0.0, 0.0), (0.0, 0.0, 1.0))        # luma 0.299 and 0.114: std 0.0925
    flat = constant((0.2, 0.4, 0.6))
    scores = ContrastReward()(torch.cat([black_white, red_blue, flat]), [""] * 3)
    torch.testing.assert_close(scores, torch.tensor([0.5, (WR - WB) / 2, 0.0]), atol=2e-6, rtol=0)


def test_contrast_gradient_pushes_bright_up_and_dark_down():
    images = split((0.2, 0.2, 0.2), (0.8, 0.8, 0.8)).requires_grad_()
    ContrastReward()(images, [""]).sum().backward()
    # d std / d luma_i = (luma_i - mean) / (N std) = ±1/N for two equal halves; times each channel's luma weight
    weights = torch.tensor([WR, WG, WB])[:, None, None]
    expected = torch.empty(1, 3, H, W)
    expected[..., : W // 2] = -weights / N
    expected[..., W // 2 :] = weights / N
    torch.testing.assert_close(images.grad, expected)


def test_contrast_gradient_is_finite_on_flat_images():
    images = constant((0.0, 0.0, 0.0), (0.5, 0.5, 0.5)).requires_grad_()   # luma variance exactly 0
    ContrastReward()(images, ["", ""]).sum().backward()
    assert torch.isfinite(images.grad).all()


@pytest.mark.parametrize("reward_class", [BrightnessReward, SaturationReward, ContrastReward])
def test_batch_scores_match_single_image_scores(reward_class):
    images = torch.rand(3, 3, H, W, generator=torch.Generator().manual_seed(0))
    reward = reward_class()
    batched = reward(images, [""] * 3)
    singles = torch.cat([reward(image[None], [""]) for image in images])
    assert batched.shape == (3,) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, singles)
    assert reward.differentiable is True


@pytest.mark.parametrize("reward_class", [BrightnessReward, SaturationReward, ContrastReward])
def test_half_precision_images_give_float32_scores(reward_class):
    images = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    scores = reward_class()(images.to(torch.bfloat16), ["", ""])
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    torch.testing.assert_close(scores, reward_class()(images, ["", ""]), atol=1e-2, rtol=0)
