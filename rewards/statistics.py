"""Differentiable image statistics (brightness, saturation, contrast): cheap rewards for tests and demos.

Each takes images [B, 3, H, W] in [0, 1] and returns float32 [B], computed in float32 whatever the input precision.
"""

from __future__ import annotations

from torch import Tensor, nn

FLAT_EPS = 1e-12  # added to the variance; moves the std by at most 1e-6 (at zero), far below image quantisation


def luma(images: Tensor) -> Tensor:
    """Rec.601 luma Y' = 0.299 R + 0.587 G + 0.114 B, [B, 3, H, W] -> float32 [B, H, W]."""
    images = images.float()
    return 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]


class BrightnessReward(nn.Module):
    """Mean Rec.601 luma of the image, in [0, 1]; differentiable."""

    differentiable = True

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return luma(images).mean(dim=(1, 2))


class SaturationReward(nn.Module):
    """Mean HSV-style chroma max(R,G,B) - min(R,G,B) over pixels, in [0, 1]; differentiable."""

    differentiable = True

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        images = images.float()
        chroma = images.amax(dim=1) - images.amin(dim=1)
        return chroma.mean(dim=(1, 2))


class ContrastReward(nn.Module):
    """RMS contrast: standard deviation of luma over the image's pixels, in [0, 0.5]; differentiable."""

    differentiable = True

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        # Population variance (correction=0): a statistic of this image's pixels, not an estimate from a sample.
        variance = luma(images).flatten(1).var(dim=1, correction=0)
        return (variance + FLAT_EPS).sqrt()  # plain std has a 0/0 = NaN gradient on a flat image
