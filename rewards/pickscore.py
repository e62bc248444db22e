"""PickScore v1 (Kirstain et al. 2023, "Pick-a-Pic", arXiv 2305.01569): a CLIP ViT-H/14 fine-tuned on human
preferences between generated images; score = logit_scale.exp() · cos(image, prompt).

Original path (yuvalkirstain/PickScore README): AutoModel `yuvalkirstain/PickScore_v1`, AutoProcessor
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (PIL resize + centre crop to 224, OpenAI mean/std as open_clip's config for
that model; padding, truncation to 77 tokens), L2-normalised get_image_features / get_text_features, then
`model.logit_scale.exp() * (text_embs @ image_embs.T)`. Here the image side is rewards.preprocess on tensors.
Verified in tests/rewards/test_clip_rewards.py: the same score as that path on a tiny random CLIP with PIL images,
the transformers architecture at the published ViT-H/14 config has open_clip's published parameter count (986.11 M),
finite-difference gradients. Unverified here (no download): the hub files themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from rewards.clip_score import clip_text_image_cosine, load_clip
from rewards.preprocess import at_least_float32
from rewards.weights import folder_holds, pretrained_present, weights_present

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase


class PickScoreReward(nn.Module):
    """PickScore v1: human-preference CLIP ViT-H/14, logit_scale·cos(image, prompt)."""

    differentiable = True
    HUB_ID = "yuvalkirstain/PickScore_v1"
    PROCESSOR_HUB_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"   # the tokenizer the original README uses

    def __init__(self, model: CLIPModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.requires_grad_(False).eval()

    @classmethod
    def pretrained(cls, local_path: str | None = None) -> PickScoreReward:
        """The published model: `local_path` (reward_weights.pickscore, a copy of the PickScore_v1 repo, which may
        also hold the tokenizer files) or the hub."""
        return cls(*load_clip(cls.HUB_ID, cls.PROCESSOR_HUB_ID, "reward_weights.pickscore", local_path))

    @classmethod
    def from_config(cls, config: CLIPConfig, tokenizer: PreTrainedTokenizerBase) -> PickScoreReward:
        """Random weights of the given architecture (tests)."""
        from transformers import CLIPModel

        return cls(CLIPModel(config), tokenizer)

    @classmethod
    def weights_present(cls, local_path: str | None = None) -> bool:
        return pretrained_present(cls.HUB_ID, local_path) and (folder_holds(local_path, "tokenizer_config.json") or
                                                                weights_present("tokenizer_config.json",
                                                                                cls.PROCESSOR_HUB_ID))

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        scale = at_least_float32(self.model.logit_scale).exp()
        return scale * clip_text_image_cosine(self.model, self.tokenizer, images, prompts)
