"""rewards.compressibility: JPEG sizes in kB against Pillow run by hand on the same pixels."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from rewards.compressibility import CompressibilityReward, IncompressibilityReward


def pattern(seed: int, size: int = 32) -> np.ndarray:
    """A uint8 HWC image whose channels differ, so a mixed-up channel order changes the JPEG."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    image = np.stack([np.add.outer(ramp, ramp) / 2, rng.integers(0, 256, (size, size)), np.tile(ramp, (size, 1))], -1)
    return image.astype(np.uint8)


def as_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC arrays -> [B, 3, H, W] in [0, 1], exactly recoverable by ×255 and rounding."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def jpeg_kb(array: np.ndarray) -> float:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_sizes_match_pillow_at_quality_95_in_kb():
    arrays = [pattern(0), pattern(1)]
    expected = torch.tensor([jpeg_kb(a) for a in arrays])
    images = as_tensor(arrays)
    torch.testing.assert_close(IncompressibilityReward()(images, ["", ""]), expected)
    torch.testing.assert_close(CompressibilityReward()(images, ["", ""]), -expected)


def test_pixels_are_rounded_to_the_nearest_uint8_level():
    arrays = [pattern(5)]
    offsets = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.9 / 255
    images = (as_tensor(arrays) + offsets).clamp(0, 1)   # within ±0.45 of a level: rounding recovers the array
    torch.testing.assert_close(IncompressibilityReward()(images, [""]), torch.tensor([jpeg_kb(arrays[0])]))


def test_out_of_range_values_are_clipped_not_wrapped():
    array = pattern(6)
    images = as_tensor([array]) * 1.2 - 0.1   # overshoots below 0 and above 1, as a VAE decode can
    clipped = (images.clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    torch.testing.assert_close(IncompressibilityReward()(images, [""]), torch.tensor([jpeg_kb(clipped)]))


def test_flat_image_is_more_compressible_than_noise():
    generator = torch.Generator().manual_seed(0)
    images = torch.cat([torch.full((1, 3, 64, 64), 0.5), torch.rand(1, 3, 64, 64, generator=generator)])
    flat, noise = CompressibilityReward()(images, ["", ""])
    assert flat > noise + 1.0   # noise at q95 is several kB; a flat 64x64 image well under one
    flat, noise = IncompressibilityReward()(images, ["", ""])
    assert noise > flat + 1.0


def test_output_is_float32_per_image_without_grad_on_the_input_device():
    images = as_tensor([pattern(2), pattern(3), pattern(4)]).requires_grad_()
    for reward in (CompressibilityReward(), IncompressibilityReward()):
        scores = reward(images, [""] * 3)
        assert scores.shape == (3,) and scores.dtype == torch.float32
        assert scores.device == images.device and not scores.requires_grad
        assert reward.differentiable is False
