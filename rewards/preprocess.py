"""Differentiable CLIP-style image preprocessing: resize the short side, centre crop, normalise — all torch ops.

The original reward models preprocess PIL images: transformers' CLIPImageProcessor (PIL backend: PickScore, CLIP
score), OpenAI `clip`'s and open_clip's torchvision transforms (aesthetic predictor, HPSv2). All of them resize the
shorter side to `size` with bicubic filtering (output long side int(size * long / short)), centre crop size×size,
scale to [0, 1] and normalise. `torch.nn.functional.interpolate(mode="bicubic", antialias=True)` uses PIL's bicubic
filter (a = -0.5, kernel widened by the downscale factor); run as PIL runs it (horizontal pass, clip, vertical pass,
clip) it differs from PIL on the same pixels only by PIL's rounding to uint8 after each pass. HPSv2 instead resizes
the float tensor with torchvision (`like_pil=False`: one unclipped pass, equal up to float rounding). Verified against
CLIPImageProcessorPil, CLIPImageProcessor (torch backend, which also resizes uint8), open_clip's eval transform and
torchvision's tensor Resize in tests/rewards/test_preprocess.py.

Crop offset: (H - size) // 2 as in transformers; torchvision's CenterCrop rounds (H - size) / 2 instead, so when the
overhang is odd the open_clip / OpenAI-clip crop can sit one pixel further down or right. Square images (the usual
Stable Diffusion output) are not cropped at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# transformers' image_utils.OPENAI_CLIP_MEAN/STD; also open_clip's OPENAI_DATASET_MEAN/STD, which the LAION ViT-H-14
# (PickScore, HPSv2) keeps.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side = size and the longer int(size * long / short), as PIL processors do."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def preprocess_images(images: Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...], *,
                      crop: bool = True, like_pil: bool = True) -> Tensor:
    """Images [B, 3, H, W] in [0, 1] -> the backbone's input [B, 3, size, size] in the images' dtype.

    crop=False resizes to size×size directly (a backbone whose processor squashes instead of cropping).
    like_pil=False resizes as torchvision does a float tensor (one 2-D pass, no clipping), for originals that convert
    to a tensor before resizing (HPSv2).
    """
    # CPU has no half-precision antialiased bicubic kernel; float32 is exact enough and cheap next to a ViT.
    work = at_least_float32(images)
    height, width = images.shape[-2:]
    target = resized_size(height, width, size) if crop else (size, size)
    if like_pil:
        work = resize_bicubic_like_pil(work, target)
    elif target != (height, width):
        work = F.interpolate(work, size=target, mode="bicubic", antialias=True, align_corners=False)
    if crop:
        top, left = (target[0] - size) // 2, (target[1] - size) // 2
        work = work[..., top:top + size, left:left + size]
    mean_t = torch.tensor(mean, dtype=work.dtype, device=work.device)[:, None, None]
    std_t = torch.tensor(std, dtype=work.dtype, device=work.device)[:, None, None]
    return ((work - mean_t) / std_t).to(images.dtype)


def at_least_float32(tensor: Tensor) -> Tensor:
    """float32 for half precisions, float64 kept (gradient checks run whole rewards in float64)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def resize_bicubic_like_pil(images: Tensor, size: tuple[int, int]) -> Tensor:
    """PIL's bicubic resize in torch: a horizontal then a vertical pass, each clipped to [0, 1] as PIL's uint8
    intermediate is (bicubic overshoots at edges); only PIL's rounding to 1/255 steps is left out."""
    for pass_size in ((images.shape[-2], size[1]), size):
        if pass_size != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=pass_size, mode="bicubic", antialias=True, align_corners=False)
            images = images.clamp(0, 1)
    return images
