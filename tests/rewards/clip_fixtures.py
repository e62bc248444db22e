"""Shared by the CLIP-family reward tests: tiny random configs, photo-like test images, and the score tolerance.

Score tolerance (`preprocessing_tolerance`): the original path sees PIL's uint8 pixels, ours the unrounded ones; per
normalised element the two inputs differ by rounding errors of rms at most 0.42/255 / std_c, independent from pixel
to pixel (tests/rewards/test_preprocess.py). To first order the score moves by grad · d, a sum of independent terms
with standard deviation ||grad / std||_2 · 0.42/255, where grad is the score's gradient w.r.t. the preprocessed
input, measured on the test image. The tolerance is 4 such standard deviations. Wiring mistakes (unnormalised or
unprojected embeddings, wrong mean/std, a different scale) move scores by far more: the tests check that too.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from rewards.preprocess import OPENAI_CLIP_STD

PROMPTS = ["a photo of a cat", "a red circle on a plain background, beautiful painting of a sunset " * 8]
IMAGE_SHAPES = [(48, 64), (40, 40)]  # (height, width): a landscape crop and a square, both downscaled to 32


def tiny_clip_config(tokenizer, projection_dim: int = 16):
    """A 2-layer CLIP at 32 px with the tiny BPE tokenizer's vocabulary (diffrl.tiny_tokenizer)."""
    from transformers import CLIPConfig

    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2,
            "num_hidden_layers": 2, "max_position_embeddings": 77, "projection_dim": projection_dim,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 2,
              "image_size": 32, "patch_size": 8, "projection_dim": projection_dim}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 HWC: smooth colour blobs plus pixel noise, so both the low-pass and the edge behaviour matter."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BILINEAR), dtype=np.int64)
    return np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)


def as_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC arrays of one shape -> [B, 3, H, W] in [0, 1], the same pixels PIL sees."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def preprocessing_tolerance(score_of_pixels, pixel_values: torch.Tensor) -> torch.Tensor:
    """Per image: 4 · ||d score / d pixel_values / std||_2 · 0.42/255, see the module docstring."""
    pixel_values = pixel_values.detach().clone().requires_grad_()
    score_of_pixels(pixel_values).sum().backward()   # images are independent: the sum's gradient splits per image
    std = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    return 4 * (pixel_values.grad / std).flatten(1).norm(dim=1) * 0.42 / 255


def smooth_images(batch: int, height: int, width: int) -> torch.Tensor:
    """float64 images in [0.3, 0.7]: the preprocessing's clipping to [0, 1] stays inactive, so rewards are smooth."""
    coarse = torch.rand(batch, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return 0.3 + 0.4 * torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")


def assert_gradient_matches_finite_differences(score, images: torch.Tensor, directions: int = 2) -> None:
    """d score / d images along random directions u against central differences (f(x + εu) - f(x - εu)) / 2ε.

    float64, ε = 1e-5: the difference's error is O(ε²) ≈ 1e-10 relative for these smooth maps, rounding ≈ 1e-11;
    measured 2e-8 on the tiny CLIPs. 1e-6 relative rejects any gradient that is wrong by more than that, e.g. a
    missing path or factor, which shows as an O(1) error.
    """
    images = images.detach().clone().requires_grad_()
    gradient, = torch.autograd.grad(score(images).sum(), images)
    assert gradient.abs().sum() > 0
    generator = torch.Generator().manual_seed(1)
    for _ in range(directions):
        direction = torch.randn(images.shape, dtype=images.dtype, generator=generator)
        with torch.no_grad():
            numeric = (score(images + 1e-5 * direction) - score(images - 1e-5 * direction)) / 2e-5
        analytic = (gradient * direction).flatten(1).sum(1)
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=0)
