"""LoRA round trip through plain diffusers, alpha preserved."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from diffrl.lora import LORA_WEIGHTS_NAME, add_lora, load_lora_into, save_lora
from diffrl.models import build_tiny_pipeline
from tests.conftest import PROMPTS, perturb_lora


def _images(pipe, latents):
    return pipe(PROMPTS, latents=latents, num_inference_steps=4, guidance_scale=5.0, eta=0.0,
                output_type="pt").images


def test_saved_lora_loads_in_plain_diffusers_with_alpha_not_equal_rank(tiny_pipe, tmp_path):
    add_lora(tiny_pipe.unet, rank=4, alpha=16)  # scale alpha/rank = 4: a loader assuming alpha = rank is 4x off
    perturb_lora(tiny_pipe.unet, scale=0.1)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    trained = _images(tiny_pipe, latents)
    save_lora(tiny_pipe.unet, tmp_path)

    plain = build_tiny_pipeline()
    base = _images(plain, latents)
    plain.load_lora_weights(tmp_path)
    torch.testing.assert_close(_images(plain, latents), trained, rtol=0, atol=1e-6)
    assert (trained - base).abs().max() > 1e-3  # the adapter really changes the images

    with safe_open(str(tmp_path / LORA_WEIGHTS_NAME), "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["unet.lora_alpha"] == 16 and metadata["unet.r"] == 4


def test_lora_parameters_are_float32_and_start_at_the_base_model(tiny_pipe):
    tiny_pipe.unet.to(torch.bfloat16)
    params = add_lora(tiny_pipe.unet, rank=2, target_modules=("to_q", "to_v"))
    assert params and all(p.dtype == torch.float32 for p in params)
    assert all(not p.requires_grad for n, p in tiny_pipe.unet.named_parameters() if "lora_" not in n)
    ups = [p for n, p in tiny_pipe.unet.named_parameters() if "lora_B" in n]
    assert all(torch.count_nonzero(p) == 0 for p in ups)


def test_load_lora_into_restores_weights_exactly(tiny_pipe, tmp_path):
    add_lora(tiny_pipe.unet, rank=4, alpha=8)
    perturb_lora(tiny_pipe.unet)
    save_lora(tiny_pipe.unet, tmp_path)
    fresh = build_tiny_pipeline()
    add_lora(fresh.unet, rank=4, alpha=8)
    load_lora_into(fresh.unet, tmp_path)
    saved = {n: p for n, p in tiny_pipe.unet.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in fresh.unet.named_parameters() if "lora_" in n}
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[n], loaded[n]) for n in saved)
