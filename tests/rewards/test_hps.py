"""rewards.hps against HPSv2's original path (tgxs002/HPSv2, hpsv2/img_score.py and the transform of its open_clip
fork) on a tiny random open_clip CLIP, and against the HPS checkpoint's key set on the meta device."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from diffrl.errors import UserInputError
from rewards import hps
from rewards.hps import HPSReward
from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from tests.rewards.clip_fixtures import (IMAGE_SHAPES, PROMPTS, as_tensor, assert_gradient_matches_finite_differences,
                                         photo_like, smooth_images)
from tests.rewards.published_architectures import HPS_VIT_H_14, assert_matches, shapes

TINY_CONFIG = {"embed_dim": 16,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def tiny_reward() -> HPSReward:
    torch.manual_seed(0)
    return HPSReward.from_config(TINY_CONFIG)


def original_scores(reward: HPSReward, arrays: list[np.ndarray], prompts: list[str]) -> torch.Tensor:
    """img_score.py: preprocess_val (ToTensor, then Resize(bicubic) and CenterCrop on the tensor, normalise),
    get_tokenizer('ViT-H-14'), model(image, text) features (L2-normalised), diagonal of image @ text.T."""
    size = TINY_CONFIG["vision_cfg"]["image_size"]
    preprocess_val = Compose([ToTensor(), Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                              Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    images = torch.stack([preprocess_val(Image.fromarray(array)) for array in arrays])
    with torch.no_grad():
        image_features = reward.model.encode_image(images, normalize=True)
        text_features = reward.model.encode_text(open_clip.get_tokenizer("ViT-H-14")(prompts), normalize=True)
        return torch.diagonal(image_features @ text_features.T)


def test_published_architecture_has_the_hps_checkpoint_keys():
    with torch.device("meta"):
        model = HPSReward.from_config(open_clip.get_model_config(hps.ARCHITECTURE)).model
    assert_matches(shapes(model), HPS_VIT_H_14)


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
def test_scores_match_the_original_path(shape):
    # The original resizes float tensors with the same torch ops as ours (no PIL rounding): the paths agree to float32
    # rounding. Resizing as PIL does instead (clipping each pass) would already differ by 3e-6 here.
    reward = tiny_reward()
    arrays = [photo_like(*shape, seed=seed) for seed in range(2)]
    with torch.no_grad():
        ours = reward(as_tensor(arrays), PROMPTS)
    torch.testing.assert_close(ours, original_scores(reward, arrays, PROMPTS), atol=1e-7, rtol=1e-6)


def test_score_is_a_plain_cosine_without_logit_scale():
    reward = tiny_reward()
    with torch.no_grad():
        reward.model.logit_scale.fill_(5.0)
        scores = reward(as_tensor([photo_like(40, 40, seed=0)] * 2), PROMPTS)
    assert scores.abs().max() <= 1.0


def test_gradient_matches_finite_differences():
    reward = tiny_reward().double()
    assert_gradient_matches_finite_differences(lambda x: reward(x, PROMPTS), smooth_images(2, 40, 40))
    reward(smooth_images(2, 40, 40).requires_grad_(), PROMPTS).sum().backward()
    assert all(p.grad is None for p in reward.parameters())


def test_frozen_eval_float32_output_from_bfloat16_model():
    reward = tiny_reward()
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())
    images = as_tensor([photo_like(40, 40, seed=0), photo_like(40, 40, seed=1)])
    full = reward(images, PROMPTS)
    half = reward.to(torch.bfloat16)(images.to(torch.bfloat16), PROMPTS)
    assert half.dtype == full.dtype == torch.float32 and half.shape == (2,)
    torch.testing.assert_close(half, full, atol=0.05, rtol=0)   # cosines in [-1, 1]; bf16: 8 mantissa bits


@pytest.fixture
def tiny_architecture(monkeypatch):
    """`pretrained` builds hps.ARCHITECTURE from open_clip's config; here that config is the tiny one."""
    monkeypatch.setattr(open_clip, "get_model_config", lambda name: dict(TINY_CONFIG))


def save_checkpoint(path, reward: HPSReward) -> None:
    torch.save({"state_dict": reward.model.state_dict()}, path)   # the layout img_score.py reads


@pytest.mark.parametrize("version", ["v2.0", "v2.1"])
def test_pretrained_loads_a_local_checkpoint(version, tmp_path, tiny_architecture):
    reward = tiny_reward()
    save_checkpoint(tmp_path / hps.CHECKPOINT_FILES[version], reward)
    for local_path in (tmp_path, tmp_path / hps.CHECKPOINT_FILES[version]):
        loaded = HPSReward.pretrained(str(local_path), version=version)
        images = as_tensor([photo_like(48, 64, seed=seed) for seed in range(2)])
        torch.testing.assert_close(loaded(images, PROMPTS), reward(images, PROMPTS))
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_pretrained_loads_from_the_hub_cache(tmp_path, hub_cache, tiny_architecture):
    reward = tiny_reward()
    save_checkpoint(tmp_path / "HPS_v2.1_compressed.pt", reward)
    assert not HPSReward.weights_present()
    hub_cache("xswu/HPSv2", tmp_path / "HPS_v2.1_compressed.pt")
    assert HPSReward.weights_present()
    images = as_tensor([photo_like(40, 40, seed=2)])
    torch.testing.assert_close(HPSReward.pretrained()(images, PROMPTS[:1]), reward(images, PROMPTS[:1]))


def test_folder_without_the_versions_file_names_it(tmp_path):
    save_checkpoint(tmp_path / "HPS_v2.1_compressed.pt", tiny_reward())
    with pytest.raises(UserInputError, match="neither HPS_v2_compressed.pt nor a folder holding it"):
        HPSReward.pretrained(str(tmp_path), version="v2.0")


def test_checkpoint_of_another_model_is_named(tmp_path, tiny_architecture):
    torch.save({"state_dict": {"visual.proj": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(UserInputError, match=r"other.pt is not an HPS v2.1 checkpoint: \d+ keys missing, 0 unexpected "
                                             r"and 1 of another shape"):
        HPSReward.pretrained(str(tmp_path / "other.pt"))


def test_unknown_version_lists_the_versions():
    with pytest.raises(UserInputError, match="unknown HPS version 'v3'; valid HPS versions: v2.0, v2.1"):
        HPSReward.pretrained(version="v3")
