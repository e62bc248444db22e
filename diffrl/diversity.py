"""Diversity of a model's samples for one prompt: how different its images are across seeds.

Reward fine-tuning trades diversity for reward (mode collapse is the field's main failure), so every figure of reward
should come with one of these. Each metric is computed per prompt over that prompt's samples and then averaged over
prompts, with a standard error over prompts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pairwise_distances(features: Tensor) -> Tensor:
    """Euclidean distances between all n(n−1)/2 pairs of rows of `features` [n, ...] (flattened), float32."""
    flat = features.detach().float().flatten(1)
    rows, cols = torch.triu_indices(len(flat), len(flat), offset=1)
    return (flat[rows] - flat[cols]).norm(dim=1)


def pixel_diversity(images: Tensor) -> float:
    """Mean pairwise RMS pixel distance between images [n, 3, H, W] in [0, 1] of the same prompt: 0 when all are
    identical, at most 1. Needs no weights and always works; sensitive to colour, brightness and layout, blind to
    whether two different-looking images show the same thing (use an embedding metric for that)."""
    if len(images) < 2:
        raise ValueError("diversity needs at least two samples per prompt")
    return float(pairwise_distances(images).mean() / math.sqrt(images[0].numel()))


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    """Mean over prompts and its standard error std/√n (sample std, n − 1); the error is 0 for a single prompt."""
    tensor = torch.tensor(values, dtype=torch.float64)
    error = float(tensor.std(correction=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(tensor.mean()), error
