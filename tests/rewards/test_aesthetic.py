"""rewards.aesthetic against the original predictor's layout and formula (improved-aesthetic-predictor,
simple_inference.py), on tiny random CLIPs; the real architecture's keys on the meta device. Tolerances: see
tests/rewards/clip_fixtures.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from diffrl.errors import UserInputError
from diffrl.tiny_tokenizer import build_tiny_tokenizer
from rewards.aesthetic import AestheticHead, AestheticReward
from tests.rewards.clip_fixtures import (IMAGE_SHAPES, as_tensor, assert_gradient_matches_finite_differences,
                                         photo_like, preprocessing_tolerance, smooth_images, tiny_clip_config)
from tests.rewards.published_architectures import (AESTHETIC_HEAD, CLIP_VIT_L_14_CONFIG, CLIP_VIT_L_14_VISION,
                                                   assert_matches, shapes)


def original_mlp() -> nn.Sequential:
    """The original MLP.layers, written out from simple_inference.py (ReLUs commented out there)."""
    return nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1)).eval()


def tiny_reward() -> AestheticReward:
    """A 2-layer CLIP vision tower projecting to 768, ViT-L/14's embedding size, which the head takes."""
    torch.manual_seed(0)
    return AestheticReward.from_config(tiny_clip_config(build_tiny_tokenizer(), projection_dim=768).vision_config)


def original_scores(reward: AestheticReward, arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """simple_inference.py on PIL images: preprocess, encode_image, numpy L2-normalise (zero-norm guard), MLP."""
    size = reward.vision_model.config.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pixel_values = torch.from_numpy(np.stack(processor(images=[Image.fromarray(a) for a in arrays],
                                                       return_tensors="np")["pixel_values"]))
    mlp = original_mlp()
    mlp.load_state_dict({f"{k[len('layers.'):]}": v for k, v in reward.head.state_dict().items()})
    with torch.no_grad():
        features = reward.vision_model(pixel_values=pixel_values).image_embeds.numpy()
        norms = np.atleast_1d(np.linalg.norm(features, 2, -1))
        norms[norms == 0] = 1
        return mlp(torch.from_numpy(features / norms[:, None])).squeeze(-1), pixel_values


def test_head_has_the_original_checkpoint_keys_and_shapes():
    assert_matches(shapes(AestheticHead()), AESTHETIC_HEAD)


def test_vision_tower_at_the_published_config_has_the_published_keys():
    with torch.device("meta"):
        tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L_14_CONFIG["vision_config"]))
    assert_matches(shapes(tower), CLIP_VIT_L_14_VISION)


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
def test_scores_match_the_original_path_on_pil_images(shape):
    reward = tiny_reward()
    arrays = [photo_like(*shape, seed=seed) for seed in range(3)]
    expected, pixel_values = original_scores(reward, arrays)
    with torch.no_grad():
        ours = reward(as_tensor(arrays), [""] * 3)
        same_pixels = reward.score_pixels(pixel_values)
    torch.testing.assert_close(same_pixels, expected, atol=1e-5, rtol=1e-5)   # same input: float rounding only
    tolerance = preprocessing_tolerance(reward.score_pixels, pixel_values)
    assert ((ours - expected).abs() <= tolerance).all(), (ours - expected, tolerance)


def test_unnormalised_embeddings_would_fail_the_tolerance():
    reward = tiny_reward()
    arrays = [photo_like(48, 64, seed=seed) for seed in range(3)]
    expected, pixel_values = original_scores(reward, arrays)
    with torch.no_grad():
        unnormalised = reward.head(reward.vision_model(pixel_values=pixel_values).image_embeds)
    assert ((unnormalised - expected).abs() > preprocessing_tolerance(reward.score_pixels, pixel_values)).all()


def test_gradient_matches_finite_differences():
    reward = tiny_reward().double()
    assert_gradient_matches_finite_differences(lambda x: reward(x, ["", ""]), smooth_images(2, 40, 40))
    reward(smooth_images(2, 40, 40).requires_grad_(), ["", ""]).sum().backward()
    assert all(p.grad is None for p in reward.parameters())   # frozen: no gradient is computed for the weights


def test_frozen_eval_float32_output_from_bfloat16_model():
    reward = tiny_reward()
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())
    images = as_tensor([photo_like(40, 40, seed=0), photo_like(40, 40, seed=1)])
    full = reward(images, ["", ""])
    half = reward.to(torch.bfloat16)(images.to(torch.bfloat16), ["", ""])
    assert half.dtype == full.dtype == torch.float32 and half.shape == (2,)
    torch.testing.assert_close(half, full, atol=0.05 * full.abs().max().item(), rtol=0)   # bf16: 8 mantissa bits


def save_local_copy(folder, reward: AestheticReward) -> None:
    """A folder as a user makes it: openai/clip-vit-large-patch14's files (a full CLIPModel) plus the head file."""
    clip = CLIPModel(tiny_clip_config(build_tiny_tokenizer(), projection_dim=768))
    clip.vision_model.load_state_dict(reward.vision_model.vision_model.state_dict())
    clip.visual_projection.load_state_dict(reward.vision_model.visual_projection.state_dict())
    clip.save_pretrained(folder)
    torch.save(reward.head.state_dict(), folder / AestheticReward.HEAD_FILE)


def test_pretrained_loads_a_local_copy(tmp_path):
    reward = tiny_reward()
    save_local_copy(tmp_path, reward)
    assert AestheticReward.weights_present(str(tmp_path))
    loaded = AestheticReward.pretrained(str(tmp_path))
    images = as_tensor([photo_like(48, 64, seed=seed) for seed in range(2)])
    torch.testing.assert_close(loaded(images, ["", ""]), reward(images, ["", ""]))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_pretrained_loads_from_the_hub_cache(tmp_path, hub_cache):
    reward = tiny_reward()
    save_local_copy(tmp_path, reward)
    hub_cache(AestheticReward.HEAD_HUB_REPO, tmp_path / AestheticReward.HEAD_FILE)
    (tmp_path / AestheticReward.HEAD_FILE).unlink()
    hub_cache(AestheticReward.CLIP_HUB_ID, tmp_path)
    assert AestheticReward.weights_present()
    images = as_tensor([photo_like(40, 40, seed=3)])
    torch.testing.assert_close(AestheticReward.pretrained()(images, [""]), reward(images, [""]))


def test_head_file_alone_still_needs_the_clip_backbone(tmp_path):
    torch.save(AestheticHead().state_dict(), tmp_path / "head.pth")
    with pytest.raises(UserInputError, match="openai/clip-vit-large-patch14 is neither in the local cache"):
        AestheticReward.pretrained(str(tmp_path / "head.pth"))


def test_wrong_head_file_is_named(tmp_path):
    torch.save({"weight": torch.zeros(1)}, tmp_path / "head.pth")
    with pytest.raises(UserInputError, match=r"head.pth is not the aesthetic head .*: 10 keys missing, 1 unexpected"):
        AestheticReward.pretrained(str(tmp_path / "head.pth"))
