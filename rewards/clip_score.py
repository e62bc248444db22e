"""CLIP score: 100 · cos(image embedding, text embedding), default model openai/clip-vit-large-patch14 (transformers).

The scale of 100 and the default model are torchmetrics' CLIPScore (which also clamps the batch mean at 0; a reward
keeps negative values so that its gradient never vanishes). Original path: CLIPProcessor (PIL resize + centre crop,
OpenAI mean/std; text truncated to 77 tokens) -> get_image_features / get_text_features -> cosine. Here the image
side is rewards.preprocess on tensors, so gradients reach the images; the text side runs without gradients.
Verified in tests/rewards/test_clip_rewards.py: equal to the CLIPProcessor-on-PIL path on a tiny random CLIP, the
transformers architecture at the published ViT-L/14 config has the published parameter count, finite-difference
gradients.

`clip_text_image_cosine` and `load_clip` are shared with PickScore (rewards/pickscore.py), a CLIP of the same kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, at_least_float32, preprocess_images
from rewards.weights import folder_holds, load_pretrained, pretrained_present

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase

CLIP_MAX_TOKENS = 77  # CLIP's text context; longer prompts are truncated as CLIPProcessor(truncation=True) does


class ClipScoreReward(nn.Module):
    """CLIP score 100·cos(image, prompt), openai/clip-vit-large-patch14."""

    differentiable = True
    HUB_ID = "openai/clip-vit-large-patch14"
    SCALE = 100.0

    def __init__(self, model: CLIPModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.requires_grad_(False).eval()

    @classmethod
    def pretrained(cls, local_path: str | None = None, model_id: str = HUB_ID) -> ClipScoreReward:
        """The published model: `local_path` (a copy of the hub repo, from reward_weights.clip_score) or `model_id`."""
        model, tokenizer = load_clip(model_id, model_id, "reward_weights.clip_score", local_path)
        return cls(model, tokenizer)

    @classmethod
    def from_config(cls, config: CLIPConfig, tokenizer: PreTrainedTokenizerBase) -> ClipScoreReward:
        """Random weights of the given architecture (tests)."""
        from transformers import CLIPModel

        return cls(CLIPModel(config), tokenizer)

    @classmethod
    def weights_present(cls, local_path: str | None = None) -> bool:
        return pretrained_present(cls.HUB_ID, local_path)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.SCALE * clip_text_image_cosine(self.model, self.tokenizer, images, prompts)


def clip_text_image_cosine(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, images: Tensor,
                           prompts: list[str]) -> Tensor:
    """cos(image embedding, text embedding) per pair, float32 [B] (float64 for a float64 model); gradients flow to
    `images` only."""
    pixel_values = preprocess_images(images, model.config.vision_config.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    return clip_pixel_cosine(model, tokenizer, pixel_values, prompts)


def clip_pixel_cosine(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, pixel_values: Tensor,
                      prompts: list[str]) -> Tensor:
    """As clip_text_image_cosine, from already preprocessed pixel values (what CLIPProcessor returns)."""
    image_embeds = model.get_image_features(pixel_values=pixel_values.to(model.dtype)).pooler_output
    with torch.no_grad():
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=CLIP_MAX_TOKENS, return_tensors="pt")
        text_embeds = model.get_text_features(**tokens.to(model.device)).pooler_output
    return F.cosine_similarity(at_least_float32(image_embeds), at_least_float32(text_embeds), dim=-1, eps=1e-12)


def load_clip(model_id: str, tokenizer_id: str, config_key: str,
              local_path: str | None) -> tuple[CLIPModel, PreTrainedTokenizerBase]:
    """A CLIPModel (float32) and its tokenizer from a local copy of the repo or the hub; the tokenizer comes from
    `tokenizer_id` unless the local copy holds one."""
    from transformers import AutoTokenizer, CLIPModel

    model = load_pretrained(CLIPModel.from_pretrained, model_id, config_key, local_path, dtype=torch.float32)
    tokenizer_path = local_path if folder_holds(local_path, "tokenizer_config.json") else None
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, tokenizer_id, config_key, tokenizer_path)
    return model, tokenizer
