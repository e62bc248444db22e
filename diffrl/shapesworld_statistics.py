"""Reward-hacking statistics for ShapesWorld: how a model's samples of one prompt are laid out, against the data.

A trainer can win shape/colour rewards by inflating objects, parking them in one place or changing the background.
These read object size, centroid position and background colour from pixels (the exact scorer's detector in
rewards.shapes) over the samples of one prompt, and compare each distribution with the data distribution of the same
prompt (diffrl.shapesworld.samples_for_prompt) by total-variation distance between histograms: 0 = same
histogram, 1 = disjoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from diffrl.shapesworld import BACKGROUNDS, parse_prompt, samples_for_prompt
from rewards.shapes import detect

SIZE_BINS = np.linspace(0.0, 0.6, 13)      # sqrt(object area / image area); data objects span ~0.1-0.4
POSITION_BINS = np.linspace(0.0, 1.0, 6)   # centroid x or y, image fractions


@dataclass
class LayoutSample:
    """Detected layout of a set of images: one entry per object (sizes, xs, ys) or per image (the rest)."""
    sizes: np.ndarray
    xs: np.ndarray
    ys: np.ndarray
    backgrounds: np.ndarray       # index into BACKGROUNDS, per image
    object_counts: np.ndarray     # per image


def layout(images: Tensor) -> LayoutSample:
    """Object sizes and positions and the backgrounds of images [B, 3, H, W] in [0, 1]."""
    scenes = detect(images.detach().float().cpu().clamp(0, 1))
    objects = [obj for scene in scenes for obj in scene.objects]
    return LayoutSample(np.array([o.size for o in objects]), np.array([o.x for o in objects]),
                        np.array([o.y for o in objects]),
                        np.array([list(BACKGROUNDS).index(s.background) for s in scenes]),
                        np.array([len(s.objects) for s in scenes]))


def total_variation(a: np.ndarray, b: np.ndarray, bins: np.ndarray) -> float:
    """Half the L1 distance between the normalised histograms of a and b (values outside `bins` go to the end bins);
    1.0 when exactly one of them is empty (e.g. a model that draws no objects)."""
    if len(a) == 0 or len(b) == 0:
        return 0.0 if len(a) == len(b) else 1.0
    edges = np.concatenate([[-np.inf], bins[1:-1], [np.inf]])
    pa = np.histogram(a, edges)[0] / len(a)
    pb = np.histogram(b, edges)[0] / len(b)
    return float(np.abs(pa - pb).sum() / 2)


def layout_distances(samples: LayoutSample, data: LayoutSample) -> dict[str, float]:
    """TV distance per factor (size, x, y, background, object count) and the ratio of mean object sizes
    (> 1: the samples' objects are larger than the data's — the inflation hack)."""
    background_bins = np.arange(len(BACKGROUNDS) + 1) - 0.5
    count_bins = np.arange(0, 8) - 0.5
    mean_size = lambda s: float(s.sizes.mean()) if len(s.sizes) else 0.0
    return {
        "size_tv": total_variation(samples.sizes, data.sizes, SIZE_BINS),
        "x_tv": total_variation(samples.xs, data.xs, POSITION_BINS),
        "y_tv": total_variation(samples.ys, data.ys, POSITION_BINS),
        "background_tv": total_variation(samples.backgrounds, data.backgrounds, background_bins),
        "count_tv": total_variation(samples.object_counts, data.object_counts, count_bins),
        "size_ratio": mean_size(samples) / max(mean_size(data), 1e-12),
    }


DATA_SAMPLES_PER_PROMPT = 32


def data_layouts(prompts: list[str], seed: int = 1) -> list[LayoutSample] | None:
    """The data's layout of each prompt (DATA_SAMPLES_PER_PROMPT generated scenes), or None unless every prompt is a
    ShapesWorld prompt: what `diffrl evaluate` compares each model's samples of that prompt with."""
    if not prompts or any(parse_prompt(prompt) is None for prompt in prompts):
        return None
    return [layout(samples_for_prompt(prompt, DATA_SAMPLES_PER_PROMPT, seed=seed).images) for prompt in prompts]
