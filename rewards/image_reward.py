"""ImageReward v1.0: Xu et al., "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image Generation",
NeurIPS 2023, arXiv 2304.05977 — re-implemented on timm and transformers so that the published `ImageReward.pt`
(hub repo THUDM/ImageReward) loads with its keys unchanged, and differentiable from the score back to the image.

The score, as the original `ImageReward.score` / `inference_rank` / `score_gard` compute it:
image -> Resize(224, bicubic) -> CenterCrop(224) -> ToTensor -> Normalize(CLIP mean/std) -> BLIP ViT-L/16 (all 197
tokens after the final LayerNorm) -> BERT-base text encoder over the prompt (bert-base-uncased WordPiece, padded and
truncated to 35 tokens, [CLS] kept in front) with cross-attention to the image tokens in every layer -> hidden state
of [CLS] -> MLP 768->1024->128->64->16->1 (five Linear layers, no activation) -> (r - 0.16717362830052426) /
1.0333394966054072.

Verified against the original source (THUDM/ImageReward @ c1392c6, salesforce/BLIP):
- ImageReward/ImageReward.py: `_transform` (Resize bicubic, CenterCrop, RGB, ToTensor, Normalize with the OpenAI CLIP
  constants), `MLP` (Sequential indices: Linear 0, Dropout 1, Linear 2, Dropout 3, Linear 4, Dropout 5, Linear 6,
  Linear 7; the ReLUs are commented out), mean/std, and that `score` feeds the tokenizer's input_ids unchanged (BLIP's
  ITM path replaces [CLS] by [ENC]; ImageReward does not), with a self-attention mask from the padding and an all-ones
  image mask.
- ImageReward/utils.py `load`: `torch.load` of a plain state dict, `load_state_dict(strict=False)`; file names
  ImageReward.pt and med_config.json in THUDM/ImageReward.
- ImageReward/models/BLIP/blip_pretrain.py, blip.py: ViT 'large' = patch 16, width 1024, depth 24, 16 heads at
  224 px; `encoder_width` set to the ViT width (so cross-attention key/value are 1024 -> 768); `vision_proj` and
  `text_proj` exist (so are in the checkpoint) but are unused by the score; tokenizer = bert-base-uncased plus
  bos_token [DEC] and additional special token [ENC] (vocabulary 30524).
- ImageReward/models/BLIP/vit.py (identical to BLIP's models/vit.py up to the header): timm-style pre-norm blocks,
  qkv bias, exact GELU, LayerNorm eps 1e-6, no classifier head; key names are timm VisionTransformer's.
- ImageReward/models/BLIP/med.py (identical to BLIP's models/med.py up to imports) and train/src/config/
  med_config.json: BERT without token-type embeddings, cross-attention in every layer (mode 'multimodal'),
  bidirectional self-attention, padding masked with -10000 (transformers' BlipTextModel uses the dtype's minimum:
  both give a softmax weight of exactly 0), a persistent `embeddings.position_ids` buffer (so in the checkpoint).
- train/src/config/utils.py `save_model`: the checkpoint is `torch.save(model.state_dict())` of that model.
Not verifiable here (no weights can be downloaded): the published file's actual keys/dtypes and that the hub
med_config.json equals the repo's; scores against the `image-reward` package on the real weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from diffrl.errors import UserInputError
from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess_images
from rewards.weights import load_state_dict_file, resolve_weight_file, weights_present

CHECKPOINT_FILE = "ImageReward.pt"
HUB_REPO = "THUDM/ImageReward"
CONFIG_KEY = "reward_weights.image_reward"
TOKENIZER_REPO = "bert-base-uncased"      # the id BLIP's init_tokenizer loads; its vocab.txt is all we need
VOCAB_FILE = "vocab.txt"
MAX_PROMPT_TOKENS = 35                    # padding='max_length', truncation=True, max_length=35 in the original
SCORE_MEAN = 0.16717362830052426          # ImageReward.__init__: rewards = (rewards - mean) / std
SCORE_STD = 1.0333394966054072
# In the checkpoint but not used by the score: BLIP's contrastive projections and the BERT position_ids buffer (a
# persistent buffer in BLIP's med.py, a non-persistent one in transformers). Accepted when present, never required.
UNUSED_CHECKPOINT_KEYS = frozenset({
    "blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
})


@dataclass(frozen=True)
class ImageRewardConfig:
    """Architecture sizes; the defaults are ImageReward v1.0's (BLIP ViT-L/16 at 224 px, med_config.json's BERT)."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_depth: int = 24
    vision_heads: int = 16
    text_width: int = 768
    text_depth: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    vocab_size: int = 30524               # bert-base-uncased's 30522 + [DEC] + [ENC]
    max_positions: int = 512


IMAGE_REWARD_V1 = ImageRewardConfig()
HEAD_WIDTHS = (1024, 128, 64, 16, 1)      # fixed in the original MLP whatever the text width


class RewardHead(nn.Module):
    """ImageReward's MLP: Linear layers text_width->1024->128->64->16->1 with no activation between them."""

    def __init__(self, text_width: int):
        super().__init__()
        widths = (text_width, *HEAD_WIDTHS)
        linears = [nn.Linear(w_in, w_out) for w_in, w_out in zip(widths, widths[1:])]
        # The original puts Dropout (an inference no-op) after the first three Linears; Identity in those places
        # keeps its Sequential indices, so the checkpoint's mlp.layers.{0,2,4,6,7} keys load unchanged.
        self.layers = nn.Sequential(linears[0], nn.Identity(), linears[1], nn.Identity(), linears[2], nn.Identity(),
                                    linears[3], linears[4])

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


class BlipTowers(nn.Module):
    """The two BLIP towers the score uses, under BLIP's attribute names so `blip.*` checkpoint keys load unchanged."""

    def __init__(self, config: ImageRewardConfig):
        super().__init__()
        self.visual_encoder = build_vision_encoder(config)
        self.text_encoder = build_text_encoder(config)


def build_vision_encoder(config: ImageRewardConfig) -> nn.Module:
    """BLIP's ViT as timm's VisionTransformer: same key names, blocks and final norm; no pooling, no classifier."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.vision_width,
        depth=config.vision_depth, num_heads=config.vision_heads, mlp_ratio=4.0, qkv_bias=True,
        num_classes=0, global_pool="",    # forward_features returns every token after the final LayerNorm, as BLIP
    )                                     # timm's defaults match BLIP's: LayerNorm eps 1e-6, exact GELU, no dropout


def build_text_encoder(config: ImageRewardConfig) -> nn.Module:
    """BLIP's med.py BERT as transformers' BlipTextModel (a port of med.py with the same key names)."""
    from transformers import BlipTextConfig, BlipTextModel

    text_config = BlipTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.text_width, encoder_hidden_size=config.vision_width,
        intermediate_size=config.text_intermediate, num_hidden_layers=config.text_depth,
        num_attention_heads=config.text_heads, max_position_embeddings=config.max_positions, hidden_act="gelu",
        layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        bos_token_id=None, eos_token_id=None, sep_token_id=None,   # generation ids: unused by an encoder
        is_decoder=True,   # BlipTextLayer builds its cross-attention only for a decoder config; forward() is
    )                      # called with is_decoder=False, which keeps the self-attention bidirectional as in BLIP
    return BlipTextModel(text_config, add_pooling_layer=False)


def find_vocab_file(checkpoint: Path) -> Path:
    """bert-base-uncased's vocab.txt: beside the checkpoint (an offline copy), else from the Hugging Face hub."""
    beside = checkpoint.parent / VOCAB_FILE
    if beside.is_file():
        return beside
    try:
        return resolve_weight_file(VOCAB_FILE, TOKENIZER_REPO, CONFIG_KEY)
    except UserInputError as error:   # its advice to point the config key at vocab.txt would be wrong here
        raise UserInputError(f"{VOCAB_FILE} of the Hugging Face repo {TOKENIZER_REPO} (ImageReward's tokenizer) is "
                             f"neither in the local cache nor downloadable now; download it (hf download "
                             f"{TOKENIZER_REPO} {VOCAB_FILE}) or put it beside {checkpoint}") from error


def build_tokenizer(vocab_file: str | Path):
    """bert-base-uncased's WordPiece tokenizer plus BLIP's [DEC] and [ENC] special tokens (BLIP's init_tokenizer)."""
    from transformers import BertTokenizer

    # transformers 5's BertTokenizer ignores a vocab_file argument; it takes the vocabulary as a {token: id} dict.
    lines = Path(vocab_file).read_text(encoding="utf-8").split("\n")
    vocab = {token: index for index, token in enumerate(lines[:-1] if lines[-1] == "" else lines)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardModel(nn.Module):
    """ImageReward v1.0 human-preference score (BLIP ViT-L + cross-attention BERT + MLP); differentiable."""

    differentiable = True

    def __init__(self, config: ImageRewardConfig, tokenizer):
        """The architecture with fresh (random) weights; `pretrained` loads the published ones."""
        super().__init__()
        if len(tokenizer) > config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the text encoder only {config.vocab_size}")
        self.config = config
        self.tokenizer = tokenizer
        self.blip = BlipTowers(config)
        self.mlp = RewardHead(config.text_width)
        # A reward is never trained: gradients flow through it to the image only. Every dropout is 0 or Identity,
        # so train() and eval() compute the same score; eval() is set for libraries that check the flag.
        self.requires_grad_(False).eval()

    @classmethod
    def pretrained(cls, local_path: str | None = None) -> ImageRewardModel:
        """The published weights. `local_path` (reward_weights.image_reward) is ImageReward.pt or a folder holding
        it; bert-base-uncased's vocab.txt is read from beside that file when there, else from the Hugging Face hub."""
        checkpoint = resolve_weight_file(CHECKPOINT_FILE, HUB_REPO, CONFIG_KEY, local_path)
        tokenizer = build_tokenizer(find_vocab_file(checkpoint))
        with torch.device("meta"):   # no time or memory spent on random weights the checkpoint replaces
            model = cls(IMAGE_REWARD_V1, tokenizer)
        model.load_checkpoint(load_state_dict_file(checkpoint), source=str(checkpoint))
        return model

    @classmethod
    def from_config(cls, config: ImageRewardConfig, tokenizer, seed: int = 0) -> ImageRewardModel:
        """Random weights, seeded without touching the global RNG (tests)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config, tokenizer)

    @classmethod
    def weights_present(cls, local_path: str | None = None) -> bool:
        """Whether `pretrained(local_path)` finds ImageReward.pt and the tokenizer's vocab.txt without network."""
        if not weights_present(CHECKPOINT_FILE, HUB_REPO, local_path):
            return False
        checkpoint = resolve_weight_file(CHECKPOINT_FILE, HUB_REPO, CONFIG_KEY, local_path)   # local or cached
        return (checkpoint.parent / VOCAB_FILE).is_file() or weights_present(VOCAB_FILE, TOKENIZER_REPO)

    def load_checkpoint(self, state_dict: dict[str, Tensor], source: str = CHECKPOINT_FILE) -> None:
        """Load an ImageReward checkpoint: every key of this module required, only UNUSED_CHECKPOINT_KEYS extra."""
        expected = self.state_dict()
        missing = sorted(expected.keys() - state_dict.keys())
        unexpected = sorted(state_dict.keys() - expected.keys() - UNUSED_CHECKPOINT_KEYS)
        wrong_shape = sorted(key for key in expected.keys() & state_dict.keys()
                             if tuple(state_dict[key].shape) != tuple(expected[key].shape))
        kinds = [("keys missing", missing), ("unexpected keys", unexpected), ("keys of the wrong shape", wrong_shape)]
        problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:2])})" for what, keys in kinds if keys]
        if problems:
            raise UserInputError(f"{source} is not an ImageReward v1.0 checkpoint: {'; '.join(problems)}")
        on_meta = next(iter(expected.values())).is_meta
        self.load_state_dict({key: state_dict[key] for key in expected}, strict=True, assign=on_meta)
        if on_meta:
            self._materialise_position_ids()

    def _materialise_position_ids(self) -> None:
        # The one tensor a checkpoint does not provide: transformers' non-persistent position_ids buffer.
        embeddings = self.blip.text_encoder.embeddings
        device = embeddings.word_embeddings.weight.device
        embeddings.position_ids = torch.arange(self.config.max_positions, device=device).expand(1, -1)
        left_on_meta = [name for name, tensor in [*self.named_parameters(), *self.named_buffers()] if tensor.is_meta]
        if left_on_meta:
            raise RuntimeError(f"ImageReward tensors not loaded: {left_on_meta}")

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (input_ids, attention_mask), each [B, 35] on this model's device, as the original tokenizes."""
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt")
        device = self.mlp.layers[0].weight.device
        return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)

    def score_pixels(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The original `score_gard`: normalised ViT input [B, 3, S, S] and tokens -> normalised scores [B].

        float32, or float64 for a float64 model; half-precision models return float32.
        """
        dtype = self.mlp.layers[0].weight.dtype
        image_tokens = self.blip.visual_encoder.forward_features(pixels.to(dtype))
        # No encoder_attention_mask: the original's is all ones, i.e. every image token attended.
        text = self.blip.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                      encoder_hidden_states=image_tokens, is_decoder=False)
        raw = self.mlp(text.last_hidden_state[:, 0, :]).squeeze(-1)
        raw = raw.to(torch.promote_types(raw.dtype, torch.float32))
        return (raw - SCORE_MEAN) / SCORE_STD

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] and B prompts -> ImageReward scores [B]; gradients flow to the images."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
            raise ValueError(f"expected images [B, 3, H, W] and B prompts, got {tuple(images.shape)} and "
                             f"{len(prompts)} prompts")
        pixels = preprocess_images(images, self.config.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        return self.score_pixels(pixels, *self.tokenize(prompts))
