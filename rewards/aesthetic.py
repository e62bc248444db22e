"""LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor): a linear MLP on L2-normalised
CLIP ViT-L/14 image embeddings, trained on SAC + LAION-Logos + AVA ratings; scores about 1-10.

Original path (simple_inference.py): OpenAI `clip` ViT-L/14 with its PIL preprocessing (bicubic resize of the short
side to 224, centre crop, OpenAI mean/std) -> encode_image -> L2-normalise -> MLP from
`sac+logos+ava1-l14-linearMSE.pth`. Here the same ViT-L/14 weights come through transformers
(openai/clip-vit-large-patch14; CLIPVisionModelWithProjection's image_embeds is encode_image's output) and the
preprocessing is rewards.preprocess, so gradients reach the image.
Verified: the head's layout reproduces the original file's keys and shapes, read from the file itself
(layers.{0,2,4,6,7}.{weight,bias}; dropouts at 1, 3, 5; the ReLUs are commented out in the original, so there are
none); the vision tower at the published ViT-L/14 config has open_clip's published image-tower parameter count;
scores equal to the PIL preprocessing + the original formula on a tiny random CLIP (tests/rewards/test_aesthetic.py),
within the rounding tolerance of tests/rewards/clip_fixtures.py; finite-difference gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, at_least_float32, preprocess_images
from rewards.weights import (folder_holds, load_checkpoint_into, load_pretrained, load_state_dict_file,
                             pretrained_present, resolve_weight_file, weights_present)

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

CONFIG_KEY = "reward_weights.aesthetic"


class AestheticHead(nn.Module):
    """The original `MLP.layers`: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, linear (no activations), dropout in between."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds).squeeze(-1)


class AestheticReward(nn.Module):
    """LAION aesthetic predictor v2: MLP on CLIP ViT-L/14 image embeddings, about 1-10."""

    differentiable = True
    CLIP_HUB_ID = "openai/clip-vit-large-patch14"
    HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
    HEAD_HUB_REPO = "camenduru/improved-aesthetic-predictor"   # a copy of the GitHub repo's file on the hub

    def __init__(self, vision_model: CLIPVisionModelWithProjection, head: AestheticHead):
        super().__init__()
        self.vision_model = vision_model
        self.head = head
        self.requires_grad_(False).eval()

    @classmethod
    def pretrained(cls, local_path: str | None = None) -> AestheticReward:
        """The published weights. `local_path` (reward_weights.aesthetic) is the head file, or a folder holding it
        and, optionally, a copy of openai/clip-vit-large-patch14 (its config.json and weights)."""
        from transformers import CLIPVisionModelWithProjection

        head = AestheticHead()
        head_path = resolve_weight_file(cls.HEAD_FILE, cls.HEAD_HUB_REPO, CONFIG_KEY, local_path)
        load_checkpoint_into(head, load_state_dict_file(head_path), head_path, f"the aesthetic head {cls.HEAD_FILE}")
        clip_path = local_path if folder_holds(local_path, "config.json") else None
        vision_model = load_pretrained(CLIPVisionModelWithProjection.from_pretrained, cls.CLIP_HUB_ID, CONFIG_KEY,
                                       clip_path, dtype=torch.float32)
        return cls(vision_model, head)

    @classmethod
    def from_config(cls, vision_config: CLIPVisionConfig) -> AestheticReward:
        """Random weights of the given vision architecture and a head on its embedding size (tests)."""
        from transformers import CLIPVisionModelWithProjection

        return cls(CLIPVisionModelWithProjection(vision_config), AestheticHead(vision_config.projection_dim))

    @classmethod
    def weights_present(cls, local_path: str | None = None) -> bool:
        clip_path = local_path if folder_holds(local_path, "config.json") else None
        return (weights_present(cls.HEAD_FILE, cls.HEAD_HUB_REPO, local_path)
                and pretrained_present(cls.CLIP_HUB_ID, clip_path))

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        size = self.vision_model.config.image_size
        return self.score_pixels(preprocess_images(images, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))

    def score_pixels(self, pixel_values: Tensor) -> Tensor:
        """Scores, float32 [B] (float64 for a float64 model), from already preprocessed pixel values (what the
        original preprocessing returns)."""
        dtype = self.vision_model.dtype
        embeds = self.vision_model(pixel_values=pixel_values.to(dtype)).image_embeds
        embeds = F.normalize(at_least_float32(embeds), dim=-1)   # the original normalises in float32 (numpy)
        return at_least_float32(self.head(embeds.to(dtype)))
