"""JPEG-size rewards of DDPO (Black et al., arXiv 2305.13301): file size in kB at quality 95; not differentiable.

Sizes are in kB = 1000 bytes, as in the official code (kvablack/ddpo-pytorch, `jpeg_compressibility`).
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch import Tensor, nn

JPEG_QUALITY = 95  # DDPO's setting


def jpeg_sizes_kb(images: Tensor) -> Tensor:
    """Size in kB of each image encoded as JPEG at quality 95: [B, 3, H, W] in [0, 1] -> float32 [B] on CPU."""
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # PIL wants HWC
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class CompressibilityReward(nn.Module):
    """Minus the JPEG size in kB (DDPO's compressibility): simpler images score higher; not differentiable."""

    differentiable = False

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return -jpeg_sizes_kb(images).to(images.device)


class IncompressibilityReward(nn.Module):
    """The JPEG size in kB (DDPO's incompressibility): more detailed images score higher; not differentiable."""

    differentiable = False

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return jpeg_sizes_kb(images).to(images.device)
