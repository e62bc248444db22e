"""Diversity metrics on hand-built inputs."""

from __future__ import annotations

import math

import pytest
import torch

from diffrl.diversity import mean_and_standard_error, pairwise_distances, pixel_diversity


def test_identical_images_have_zero_diversity():
    images = torch.rand(1, 3, 4, 4).repeat(3, 1, 1, 1)
    assert pixel_diversity(images) == 0.0


def test_pixel_diversity_is_the_hand_computed_rms_distance():
    black, white, grey = (torch.full((1, 3, 2, 2), value) for value in (0.0, 1.0, 0.5))
    # pairs: black-white RMS 1, black-grey 0.5, white-grey 0.5 -> mean 2/3
    assert pixel_diversity(torch.cat([black, white, grey])) == pytest.approx(2 / 3)
    assert pairwise_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]])).tolist() == [5.0]


def test_standard_error_matches_a_hand_computation():
    mean, error = mean_and_standard_error([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    assert error == pytest.approx(math.sqrt(14 / 3) / 2)   # sample variance (4 + 1 + 0 + 9) / 3, n = 4
    assert mean_and_standard_error([2.0]) == (2.0, 0.0)
    with pytest.raises(ValueError, match="two samples"):
        pixel_diversity(torch.zeros(1, 3, 2, 2))
