"""The published reward checkpoints' state-dict keys and shapes, compactly, and the configs that produce them.

Each entry: number of tensors, number of parameters, sha256 of the sorted "name:shape" lines (see `signature`),
and the keys outside the repeated transformer blocks with their shapes, so a failure shows what moved.

How each was derived (no checkpoint can be downloaded here):
- AESTHETIC_HEAD: read from the real `sac+logos+ava1-l14-linearMSE.pth` in christophschuhmann/improved-aesthetic-
  predictor (git blob, sha256 21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0), loaded with
  torch.load(weights_only=True, map_location="cpu"; its tensors were saved on CUDA): all ten keys.
- HPS_VIT_H_14: built on the meta device from tgxs002/HPSv2's own open_clip fork (hpsv2/src/open_clip,
  commit 866735ec), `create_model('ViT-H-14', ...)` as hpsv2/img_score.py calls it. img_score.py loads
  checkpoint['state_dict'] into that model with strict=True, so these are the checkpoint's keys.
- CLIP_VIT_L_14, CLIP_VIT_L_14_VISION, CLIP_VIT_H_14: transformers' CLIPModel / CLIPVisionModelWithProjection at
  the configs below (the values of the hub repos' config.json: openai/clip-vit-large-patch14 and
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K, whose architecture yuvalkirstain/PickScore_v1 keeps) on the meta device,
  transformers 5.23. Independent check: the parameter counts equal open_clip's published docs/model_profile.csv
  (ViT-L-14 427.62 M total, 303.97 M image tower; ViT-H-14 986.11 M), and the ViT-H count equals the HPSv2 fork's.
  Checkpoints saved by transformers 4.x also hold `*.embeddings.position_ids` buffers, which transformers ignores
  on load (tests/rewards/test_clip_rewards.py checks that such a file loads cleanly).
"""

from __future__ import annotations

import hashlib
import math

import torch

CLIP_VIT_L_14_CONFIG = {
    "projection_dim": 768,
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                    "num_hidden_layers": 12, "projection_dim": 768},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "image_size": 224, "projection_dim": 768},
}
CLIP_VIT_H_14_CONFIG = {
    "projection_dim": 1024,
    "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                    "num_hidden_layers": 24, "projection_dim": 1024},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                      "num_hidden_layers": 32, "patch_size": 14, "image_size": 224, "projection_dim": 1024},
}

AESTHETIC_HEAD = {
    "count": 10, "parameters": 927_969,
    "sha256": "801b9be285792bb03c65108c6749112b3bac2424ba4aec24e2105ecc3bec1f57",
    "keys": {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
             "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
             "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,)},
}

CLIP_VIT_L_14 = {
    "count": 590, "parameters": 427_616_513,
    "sha256": "adf0c16ef46254fe990d5cbd8ad090b437323a923d8bea9324f3a62166e32a72",
    "keys": {"logit_scale": (), "text_model.embeddings.token_embedding.weight": (49408, 768),
             "text_model.embeddings.position_embedding.weight": (77, 768), "text_model.final_layer_norm.weight": (768,),
             "text_model.final_layer_norm.bias": (768,), "vision_model.embeddings.class_embedding": (1024,),
             "vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
             "vision_model.embeddings.position_embedding.weight": (257, 1024),
             "vision_model.pre_layrnorm.weight": (1024,), "vision_model.pre_layrnorm.bias": (1024,),
             "vision_model.post_layernorm.weight": (1024,), "vision_model.post_layernorm.bias": (1024,),
             "visual_projection.weight": (768, 1024), "text_projection.weight": (768, 768)},
}

CLIP_VIT_L_14_VISION = {
    "count": 392, "parameters": 303_966_208,
    "sha256": "e745a890e03355fea61a1dd3c16a95928070d4475dc50eb01def0a5de257eeb3",
    "keys": {k: v for k, v in CLIP_VIT_L_14["keys"].items() if k.startswith(("vision_model.", "visual_projection."))},
}

CLIP_VIT_H_14 = {
    "count": 910, "parameters": 986_109_441,
    "sha256": "1863f7fa94375cba9224d3eb7645950cf49251bda07026cfa19b42da9b85efb8",
    "keys": {"logit_scale": (), "text_model.embeddings.token_embedding.weight": (49408, 1024),
             "text_model.embeddings.position_embedding.weight": (77, 1024),
             "text_model.final_layer_norm.weight": (1024,), "text_model.final_layer_norm.bias": (1024,),
             "vision_model.embeddings.class_embedding": (1280,),
             "vision_model.embeddings.patch_embedding.weight": (1280, 3, 14, 14),
             "vision_model.embeddings.position_embedding.weight": (257, 1280),
             "vision_model.pre_layrnorm.weight": (1280,), "vision_model.pre_layrnorm.bias": (1280,),
             "vision_model.post_layernorm.weight": (1280,), "vision_model.post_layernorm.bias": (1280,),
             "visual_projection.weight": (1024, 1280), "text_projection.weight": (1024, 1024)},
}

HPS_VIT_H_14 = {
    "count": 686, "parameters": 986_109_441,
    "sha256": "ff5fb2d7c96dd8ac088f69df117c5f2e80331785b1800454574066bfc8aafe7c",
    "keys": {"positional_embedding": (77, 1024), "text_projection": (1024, 1024), "logit_scale": (),
             "visual.class_embedding": (1280,), "visual.positional_embedding": (257, 1280),
             "visual.proj": (1280, 1024), "visual.conv1.weight": (1280, 3, 14, 14), "visual.ln_pre.weight": (1280,),
             "visual.ln_pre.bias": (1280,), "visual.ln_post.weight": (1280,), "visual.ln_post.bias": (1280,),
             "token_embedding.weight": (49408, 1024), "ln_final.weight": (1024,), "ln_final.bias": (1024,)},
}


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The state dict's names and shapes (works on the meta device, where no memory is allocated)."""
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def signature(key_shapes: dict[str, tuple[int, ...]]) -> str:
    lines = sorted(f"{name}:{shape}" for name, shape in key_shapes.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def assert_matches(key_shapes: dict[str, tuple[int, ...]], published: dict) -> None:
    """Same keys and shapes as the published checkpoint: landmarks first (readable), then count, size and hash."""
    for name, shape in published["keys"].items():
        assert key_shapes.get(name) == shape, (name, key_shapes.get(name), shape)
    assert len(key_shapes) == published["count"]
    assert sum(math.prod(shape) for shape in key_shapes.values()) == published["parameters"]
    assert signature(key_shapes) == published["sha256"]
