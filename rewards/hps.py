"""Human Preference Score v2 / v2.1 (Wu et al. 2023, arXiv 2306.09341): open_clip ViT-H-14 fine-tuned on human
preferences; score = cos(image embedding, text embedding), about 0.2-0.35.

Original path (tgxs002/HPSv2, hpsv2/img_score.py): open_clip ViT-H-14, `model.load_state_dict(checkpoint['state_dict'])`
from `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` (hub model repo xswu/HPSv2, names from hpsv2/utils.py
hps_version_map), `get_tokenizer('ViT-H-14')`, preprocessing ToTensor -> Resize(224, bicubic) on the float tensor ->
CenterCrop(224) -> OpenAI mean/std (hpsv2/src/open_clip/transform.py), then the diagonal of
`image_features @ text_features.T` with both L2-normalised: a plain cosine, no logit scale.
Verified: upstream open_clip's ViT-H-14 state dict has exactly the key names and shapes of the HPSv2 repository's own
open_clip fork (which loads the checkpoint strictly), 686 tensors, 986,109,441 parameters (test data derived from
that fork); on a tiny random model our tensor path equals that transform + formula (tests/rewards/test_hps.py).
Unverified here (no download): that the checkpoint files load with torch.load(weights_only=True).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffrl.errors import unknown_name
from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, at_least_float32, preprocess_images
from rewards.weights import load_checkpoint_into, load_state_dict_file, resolve_weight_file, weights_present

if TYPE_CHECKING:
    from open_clip.model import CLIP
    from open_clip.tokenizer import SimpleTokenizer

HUB_REPO = "xswu/HPSv2"
CHECKPOINT_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
DEFAULT_VERSION = "v2.1"  # the authors' newer model, trained on better data; scores of v2.0 and v2.1 do not compare
ARCHITECTURE = "ViT-H-14"


class HPSReward(nn.Module):
    """HPS v2.1: human-preference open_clip ViT-H-14, cos(image, prompt)."""

    differentiable = True

    def __init__(self, model: CLIP, tokenizer: SimpleTokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.requires_grad_(False).eval()

    @classmethod
    def pretrained(cls, local_path: str | None = None, version: Literal["v2.0", "v2.1"] = DEFAULT_VERSION
                   ) -> HPSReward:
        """The published checkpoint: `local_path` (reward_weights.hps: the .pt file, or a folder holding it) or
        the hub."""
        import open_clip

        if version not in CHECKPOINT_FILES:
            raise unknown_name("HPS version", version, CHECKPOINT_FILES)
        path = resolve_weight_file(CHECKPOINT_FILES[version], HUB_REPO, "reward_weights.hps", local_path)
        checkpoint = load_state_dict_file(path)
        reward = cls.from_config(open_clip.get_model_config(ARCHITECTURE))
        load_checkpoint_into(reward.model, checkpoint.get("state_dict", {}), path, f"an HPS {version} checkpoint")
        return reward

    @classmethod
    def from_config(cls, model_config: dict) -> HPSReward:
        """An open_clip CLIP built from `model_config` (the shape of open_clip's model JSONs), random weights."""
        from open_clip.model import CLIP
        from open_clip.tokenizer import SimpleTokenizer

        return cls(CLIP(**model_config), SimpleTokenizer(context_length=model_config["text_cfg"]["context_length"]))

    @classmethod
    def weights_present(cls, local_path: str | None = None) -> bool:
        return weights_present(CHECKPOINT_FILES[DEFAULT_VERSION], HUB_REPO, local_path)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        size = self.model.visual.image_size[0]
        # HPSv2 converts to a tensor before resizing: torchvision's float path, not PIL's (rewards/preprocess.py).
        pixels = preprocess_images(images, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, like_pil=False)
        return self.score_pixels(pixels, prompts)

    def score_pixels(self, pixel_values: Tensor, prompts: list[str]) -> Tensor:
        """Scores, float32 [B], from already preprocessed pixel values (what the original transform returns)."""
        dtype = self.model.visual.conv1.weight.dtype
        image_features = self.model.encode_image(pixel_values.to(dtype))
        with torch.no_grad():
            text_features = self.model.encode_text(self.tokenizer(prompts).to(pixel_values.device))
        return F.cosine_similarity(at_least_float32(image_features), at_least_float32(text_features), dim=-1,
                                   eps=1e-12)
