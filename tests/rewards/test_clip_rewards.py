"""rewards.clip_score and rewards.pickscore against the original CLIPProcessor-on-PIL path and score formulas
(torchmetrics' 100·cos; PickScore's README: logit_scale.exp() · normalised text @ image), on tiny random CLIPs; the
published architectures' keys on the meta device. Tolerances: see tests/rewards/clip_fixtures.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from diffrl.errors import UserInputError
from diffrl.tiny_tokenizer import build_tiny_tokenizer
from rewards.clip_score import ClipScoreReward, clip_pixel_cosine
from rewards.pickscore import PickScoreReward
from tests.rewards.clip_fixtures import (IMAGE_SHAPES, PROMPTS, as_tensor, assert_gradient_matches_finite_differences,
                                         photo_like, preprocessing_tolerance, smooth_images, tiny_clip_config)
from tests.rewards.published_architectures import (CLIP_VIT_H_14, CLIP_VIT_H_14_CONFIG, CLIP_VIT_L_14,
                                                   CLIP_VIT_L_14_CONFIG, assert_matches, shapes)

REWARD_CLASSES = [ClipScoreReward, PickScoreReward]


def tiny(reward_class):
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    return reward_class.from_config(tiny_clip_config(tokenizer), tokenizer)


def original_scale(reward) -> torch.Tensor:
    """torchmetrics' CLIPScore multiplies by 100; PickScore's README by model.logit_scale.exp()."""
    return torch.tensor(100.0) if isinstance(reward, ClipScoreReward) else reward.model.logit_scale.exp()


def original_scores(reward, arrays: list[np.ndarray], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The original path: CLIPProcessor (PIL image processor) with padding and truncation to 77 tokens,
    get_image_features / get_text_features, L2-normalise, scale · per-pair dot product."""
    size = reward.model.config.vision_config.image_size
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": size},
                                                                    crop_size={"height": size, "width": size}),
                              tokenizer=reward.tokenizer)
    inputs = processor(text=prompts, images=[Image.fromarray(a) for a in arrays], padding=True, truncation=True,
                       max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = reward.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text_embs = reward.model.get_text_features(input_ids=inputs["input_ids"],
                                                   attention_mask=inputs["attention_mask"]).pooler_output
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        return original_scale(reward) * (image_embs * text_embs).sum(-1), inputs["pixel_values"]


@pytest.mark.parametrize("config, published", [(CLIP_VIT_L_14_CONFIG, CLIP_VIT_L_14),
                                               (CLIP_VIT_H_14_CONFIG, CLIP_VIT_H_14)], ids=["ViT-L-14", "ViT-H-14"])
def test_published_architectures_have_the_published_keys(config, published):
    with torch.device("meta"):
        model = CLIPModel(CLIPConfig(**config))
    assert_matches(shapes(model), published)


def test_checkpoints_with_legacy_position_ids_load_cleanly(tmp_path):
    # Hub checkpoints saved by transformers 4.x carry embeddings.position_ids buffers that models now recreate.
    model = tiny(ClipScoreReward).model
    model.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(state, tmp_path / "model.safetensors")
    loaded, info = CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(loaded.visual_projection.weight, model.visual_projection.weight)


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("reward_class", REWARD_CLASSES)
def test_scores_match_the_original_path_on_pil_images(reward_class, shape):
    reward = tiny(reward_class)
    arrays = [photo_like(*shape, seed=seed) for seed in range(2)]
    expected, pixel_values = original_scores(reward, arrays, PROMPTS)
    with torch.no_grad():
        ours = reward(as_tensor(arrays), PROMPTS)

    def score_of_pixels(pixels):   # our scoring from given pixel values, with the original's scale
        return original_scale(reward) * clip_pixel_cosine(reward.model, reward.tokenizer, pixels, PROMPTS)

    with torch.no_grad():
        torch.testing.assert_close(score_of_pixels(pixel_values), expected, atol=1e-5, rtol=1e-5)  # same input
    tolerance = preprocessing_tolerance(score_of_pixels, pixel_values)
    assert ((ours - expected).abs() <= tolerance).all(), (ours - expected, tolerance)


@pytest.mark.parametrize("reward_class", REWARD_CLASSES)
def test_long_prompts_are_truncated_to_77_tokens(reward_class):
    reward = tiny(reward_class)
    long_prompt = PROMPTS[1]
    tokens = reward.tokenizer(long_prompt)["input_ids"]
    assert len(tokens) > 77   # the test prompt really is longer than CLIP's context
    truncated = reward.tokenizer.decode(tokens[1:76])   # what fits between the start and end tokens
    images = as_tensor([photo_like(40, 40, seed=0)])
    with torch.no_grad():
        torch.testing.assert_close(reward(images, [long_prompt]), reward(images, [truncated]))
        assert (reward(images, [long_prompt]) - reward(images, ["a cat"])).abs() > 1e-4


@pytest.mark.parametrize("reward_class", REWARD_CLASSES)
def test_gradient_matches_finite_differences(reward_class):
    reward = tiny(reward_class).double()
    assert_gradient_matches_finite_differences(lambda x: reward(x, PROMPTS), smooth_images(2, 40, 40))
    reward(smooth_images(2, 40, 40).requires_grad_(), PROMPTS).sum().backward()
    assert all(p.grad is None for p in reward.parameters())   # frozen: no gradient is computed for the weights


@pytest.mark.parametrize("reward_class", REWARD_CLASSES)
def test_frozen_eval_float32_output_from_bfloat16_model(reward_class):
    reward = tiny(reward_class)
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())
    images = as_tensor([photo_like(40, 40, seed=0), photo_like(40, 40, seed=1)])
    full = reward(images, PROMPTS)
    half = reward.to(torch.bfloat16)(images.to(torch.bfloat16), PROMPTS)
    assert half.dtype == full.dtype == torch.float32 and half.shape == (2,)
    torch.testing.assert_close(half, full, atol=0.05 * full.abs().max().item(), rtol=0)   # bf16: 8 mantissa bits


def save_copy(folder, reward, with_tokenizer: bool = True) -> None:
    reward.model.save_pretrained(folder)
    if with_tokenizer:
        reward.tokenizer.save_pretrained(folder)


@pytest.mark.parametrize("reward_class", REWARD_CLASSES)
def test_pretrained_loads_a_local_copy(reward_class, tmp_path):
    reward = tiny(reward_class)
    save_copy(tmp_path, reward)
    assert reward_class.weights_present(str(tmp_path))
    loaded = reward_class.pretrained(str(tmp_path))
    images = as_tensor([photo_like(48, 64, seed=seed) for seed in range(2)])
    torch.testing.assert_close(loaded(images, PROMPTS), reward(images, PROMPTS))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_pickscore_takes_the_tokenizer_from_the_laion_repo(tmp_path, hub_cache):
    reward = tiny(PickScoreReward)
    save_copy(tmp_path / "model", reward, with_tokenizer=False)
    save_copy(tmp_path / "tokenizer", reward)
    hub_cache(PickScoreReward.HUB_ID, tmp_path / "model")
    assert not PickScoreReward.weights_present()
    with pytest.raises(UserInputError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K is neither in the local cache"):
        PickScoreReward.pretrained()
    hub_cache(PickScoreReward.PROCESSOR_HUB_ID, tmp_path / "tokenizer")
    assert PickScoreReward.weights_present()
    images = as_tensor([photo_like(40, 40, seed=2)])
    torch.testing.assert_close(PickScoreReward.pretrained()(images, PROMPTS[:1]), reward(images, PROMPTS[:1]))


def test_clip_score_model_id_is_configurable(tmp_path, hub_cache):
    reward = tiny(ClipScoreReward)
    save_copy(tmp_path, reward)
    hub_cache("someone/other-clip", tmp_path)
    images = as_tensor([photo_like(40, 40, seed=4)])
    loaded = ClipScoreReward.pretrained(model_id="someone/other-clip")
    torch.testing.assert_close(loaded(images, PROMPTS[:1]), reward(images, PROMPTS[:1]))
