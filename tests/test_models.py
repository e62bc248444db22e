"""load_pipeline: built-in tiny model, local folders, clear errors for what cannot be loaded."""

from __future__ import annotations

import pytest
import torch

from diffrl.errors import UserInputError
from diffrl.models import build_tiny_pipeline, load_pipeline
from diffrl.tiny_tokenizer import build_tiny_tokenizer


def test_tiny_pipeline_is_deterministic_and_sd_shaped():
    a, b = build_tiny_pipeline(), build_tiny_pipeline()
    for name in ("unet", "vae", "text_encoder"):
        for (key, pa), pb in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().values()):
            assert torch.equal(pa, pb), key
    assert a.unet.config.cross_attention_dim == a.text_encoder.config.hidden_size
    assert type(a).__name__ == "StableDiffusionPipeline" and type(a.scheduler).__name__ == "DDIMScheduler"


def test_tiny_tokenizer_is_a_real_clip_bpe():
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer("a photo of a cat riding a bike").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert "cat</w>" in tokens and "photo</w>" in tokens  # learned merges give whole words
    # an unseen word falls back to byte-level pieces instead of an unknown token
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("zyxq").input_ids)[1:-1]
    assert "".join(pieces).replace("</w>", "") == "zyxq"
    assert len(tokenizer("a cat", padding="max_length").input_ids) == 77


def test_local_diffusers_folder_round_trip(tmp_path):
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_pipeline(str(tmp_path))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = pipe(["a cat"], latents=latents, num_inference_steps=3, output_type="pt").images
    got = loaded(["a cat"], latents=latents, num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(got, expected)


def test_dtype_argument():
    assert load_pipeline("tiny", dtype=torch.bfloat16).unet.dtype == torch.bfloat16


def test_hub_id_missing_from_cache_gives_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserInputError) as error:
        load_pipeline("nobody-here/not-a-model")
    message = str(error.value)
    assert "nobody-here/not-a-model" in message and "HF_HOME" in message and "\n" not in message


def test_unknown_name_lists_built_ins():
    with pytest.raises(UserInputError, match="tiny"):
        load_pipeline("not_a_model")


def test_pickled_checkpoint_is_refused(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not really")
    with pytest.raises(UserInputError, match="safetensors"):
        load_pipeline(str(checkpoint))
    with pytest.raises(UserInputError, match="does not exist"):
        load_pipeline(str(tmp_path / "missing.safetensors"))
