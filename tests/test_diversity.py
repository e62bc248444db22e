"""Diversity metrics on hand-built inputs."""

from __future__ import annotations

import math

import pytest
import torch

from diffrl.diversity import (build_diversity_metrics, embedding_diversity, latent_diversity, lpips_unavailable,
                              mean_and_standard_error, pairwise_cosine_distances, pairwise_distances, pixel_diversity,
                              reward_image_encoder)
from diffrl.errors import UserInputError
from diffrl.grids import image_grid, label_font
from diffrl.tiny_tokenizer import build_tiny_tokenizer
from rewards import AestheticReward, BrightnessReward, ClipScoreReward, HPSReward, PickScoreReward
from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess_images
from tests.rewards.clip_fixtures import tiny_clip_config
from tests.rewards.test_hps import TINY_CONFIG as TINY_OPEN_CLIP_CONFIG


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


def test_cosine_distance_of_known_embeddings_is_hand_computed():
    # [1, 0] and [1, 1]: cos = 1/√2 -> distance 1 − 1/√2; the length of an embedding does not matter
    assert pairwise_cosine_distances(torch.tensor([[2.0, 0.0], [1.0, 1.0]])).tolist() == pytest.approx(
        [1 - 1 / math.sqrt(2)])
    # [1, 0], [0, 1], [−1, 0]: pairs at 90°, 180°, 90° -> distances 1, 2, 1 -> mean 4/3
    assert embedding_diversity(torch.tensor([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])) == pytest.approx(4 / 3)
    assert embedding_diversity(torch.tensor([[0.3, 0.4]]).repeat(4, 1)) == pytest.approx(0.0, abs=1e-7)


def test_latent_diversity_is_the_hand_computed_rms_distance():
    zeros, twos = torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    assert latent_diversity(torch.cat([zeros, twos])) == pytest.approx(2.0)   # every element differs by 2
    assert latent_diversity(twos.repeat(3, 1, 1, 1)) == 0.0


def _tiny_clip_rewards() -> dict:
    tokenizer = build_tiny_tokenizer()
    return {"clip_score": ClipScoreReward.from_config(tiny_clip_config(tokenizer), tokenizer),
            "pickscore": PickScoreReward.from_config(tiny_clip_config(tokenizer), tokenizer),
            "aesthetic": AestheticReward.from_config(tiny_clip_config(tokenizer).vision_config),
            "hps": HPSReward.from_config(TINY_OPEN_CLIP_CONFIG)}


def test_clip_diversity_reuses_the_image_encoder_of_each_clip_reward():
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    for name, reward in _tiny_clip_rewards().items():
        encoder = reward_image_encoder(reward)
        with torch.no_grad():
            embeddings = encoder(images)
        assert embeddings.shape[0] == 3 and embeddings.ndim == 2, name
        metrics = build_diversity_metrics(["clip"], {"brightness": BrightnessReward(), name: reward})
        assert metrics.per_prompt(images, images)["clip"] == pytest.approx(embedding_diversity(embeddings), abs=1e-6)
        assert metrics.per_prompt(images[:1].repeat(3, 1, 1, 1), images)["clip"] == pytest.approx(0.0, abs=1e-6)
        assert f"{name!r} reward" in metrics.notes[0]
    assert reward_image_encoder(BrightnessReward()) is None


def test_clip_diversity_with_a_clip_the_user_names(tmp_path):
    from transformers import CLIPModel

    model = CLIPModel(tiny_clip_config(build_tiny_tokenizer())).eval()
    model.save_pretrained(tmp_path)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    metrics = build_diversity_metrics(["clip"], {"brightness": BrightnessReward()}, clip_model=str(tmp_path))
    with torch.no_grad():
        expected = embedding_diversity(model.get_image_features(pixel_values=preprocess_images(
            images, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)).pooler_output)
    assert metrics.per_prompt(images, images)["clip"] == pytest.approx(expected, abs=1e-6)
    assert str(tmp_path) in metrics.notes[0]


def test_metrics_that_cannot_run_are_skipped_with_a_note_or_refused_when_asked_for():
    metrics = build_diversity_metrics(None, {"brightness": BrightnessReward()})
    assert list(metrics.functions) == ["pixel", "latent"] + (["lpips"] if lpips_unavailable() is None else [])
    assert any(note.startswith("clip diversity skipped: none of the rewards (brightness)") for note in metrics.notes)
    with pytest.raises(UserInputError, match="clip_score, pickscore, aesthetic, hps"):
        build_diversity_metrics(["clip"], {"brightness": BrightnessReward()})
    with pytest.raises(UserInputError, match="valid diversity metrics: clip, dreamsim, latent, lpips, pixel"):
        build_diversity_metrics(["ssim"], {})
    if lpips_unavailable() is not None:
        with pytest.raises(UserInputError, match="pip install lpips|AlexNet weights"):
            build_diversity_metrics(["lpips"], {})


def test_grid_label_font_grows_with_the_image_size():
    assert label_font(128).size < label_font(512).size < label_font(1024).size
    small, large = (image_grid(torch.rand(4, 3, side, side), ["a prompt | seed 0"] * 4, columns=2, title="t",
                               row_labels=["base", "step-000100"]) for side in (32, 512))
    # 2 cells plus a label column of half a cell, widened (up to a cell) when the longest label needs more
    assert large.width - 2 * 512 == 512 // 2 and 128 // 2 <= small.width - 2 * 128 <= 128
