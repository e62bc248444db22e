"""The SD3/3.5 family adapter on the built-in tiny-sd3, each part against diffusers' StableDiffusion3Pipeline written
out by hand: prompt encoding, the transformer call, the VAE's shift-and-scale, and the LoRA file read by the plain
pipeline with alpha ≠ rank. sd35-medium-random's configs are checked on the meta device (no memory, no compute)."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from diffrl.errors import UserInputError
from diffrl.families import StableDiffusion3Family, family_of
from diffrl.models import SD35_MEDIUM_ARCHITECTURE, build_random_sd3_pipeline, build_tiny_sd3_pipeline, load_pipeline
from tests.conftest import PROMPTS, perturb_lora
from tests.fixtures import check_lora_round_trip

CLIP_TOKENS, T5_TOKENS = 77, 256   # the pipeline's text sequence: both CLIPs' tokens, then max_sequence_length T5's


@pytest.fixture
def sd3_pipe():
    return build_tiny_sd3_pipeline()


def _noise(shape, seed: int = 0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_tiny_sd3_builds_offline_as_the_sd3_family():
    """Built from configs (the conftest sets HF_HUB_OFFLINE), seeded without touching the global RNG; SD3's VAE
    constants and scheduler shift; 32 px images whose 16x16x16 latents the transformer cuts into 2x2 patches."""
    rng = torch.get_rng_state()
    pipe = load_pipeline("tiny-sd3")
    assert torch.equal(torch.get_rng_state(), rng)
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is not None
    family = family_of(pipe)
    assert isinstance(family, StableDiffusion3Family) and family.denoiser is pipe.transformer
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert family.default_resolution() == 32 and family.latent_shape(2, 32) == (2, 16, 16, 16)
    assert len(family.frozen_modules()) == 4   # the VAE and three text encoders
    with pytest.raises(UserInputError, match="resolution 34 must be a multiple of 4"):
        family.latent_shape(1, 34)   # 17x17 latents: no whole 2x2 patches
    same = build_tiny_sd3_pipeline()
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), same.transformer.parameters()))


@pytest.mark.parametrize("do_cfg, negative_prompt", [(False, ""), (True, ""), (True, "blurry, low quality")])
def test_encode_prompts_is_the_pipelines_encode_prompt(sd3_pipe, do_cfg, negative_prompt):
    """Each half is (CLIP-L | CLIP-G hidden states zero-padded to T5's width, then T5's) and the two CLIPs' pooled
    projections side by side, as StableDiffusion3Pipeline.encode_prompt builds them; an empty negative prompt is
    the embedding of "" (not zeros, unlike SDXL)."""
    family = family_of(sd3_pipe)
    cond, uncond = family.encode_prompts(PROMPTS, negative_prompt, 4.0 if do_cfg else 1.0, 32)
    with torch.no_grad():   # as the pipeline's __call__ runs it (T5's attention rounds differently with grad)
        embeds, negative, pooled, negative_pooled = sd3_pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=do_cfg,
            negative_prompt=[negative_prompt] * 2 if negative_prompt else None)
    assert cond.prompt_embeds.shape == (2, CLIP_TOKENS + T5_TOKENS, 128) and cond.pooled_prompt_embeds.shape == (2, 64)
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled_prompt_embeds, pooled, rtol=0, atol=0)
    assert cond.add_time_ids is None
    assert (cond.prompt_embeds[:, :CLIP_TOKENS, 64:] == 0).all()   # the CLIP tokens' padding to T5's 128
    if not do_cfg:
        assert uncond is None
        return
    torch.testing.assert_close(uncond.prompt_embeds, negative, rtol=0, atol=0)
    torch.testing.assert_close(uncond.pooled_prompt_embeds, negative_pooled, rtol=0, atol=0)
    assert uncond.pooled_prompt_embeds.abs().sum() > 0


def test_as_conditioning_refuses_bare_text_embeddings(sd3_pipe):
    family = family_of(sd3_pipe)
    cond, _ = family.encode_prompts(PROMPTS, "", 1.0, 32)
    assert family.as_conditioning(cond) is cond
    with pytest.raises(ValueError, match="an SD3 transformer needs the pooled text embeddings"):
        family.as_conditioning(cond.prompt_embeds)


@pytest.mark.parametrize("per_row", [False, True])
def test_denoise_is_the_pipelines_transformer_call(sd3_pipe, per_row):
    """As StableDiffusion3Pipeline.__call__ calls its transformer: t (1000·σ, a float) broadcast over the batch, or
    one per row as a trainer recomputing steps of different trajectories passes it."""
    family = family_of(sd3_pipe)
    cond, _ = family.encode_prompts(PROMPTS, "", 1.0, 32)
    latents = _noise((2, 16, 16, 16))
    sd3_pipe.scheduler.set_timesteps(4)
    t = sd3_pipe.scheduler.timesteps[1:3] if per_row else sd3_pipe.scheduler.timesteps[1]
    assert t.dtype == torch.float32 and not float(t.flatten()[0]).is_integer()   # 1000·σ after the shift: 857.69...
    with torch.no_grad():
        output = family.denoise(sd3_pipe.transformer, latents, t, cond)
        expected = sd3_pipe.transformer(hidden_states=latents, timestep=t.expand(2),
                                        encoder_hidden_states=cond.prompt_embeds,
                                        pooled_projections=cond.pooled_prompt_embeds, return_dict=False)[0]
        other_t = family.denoise(sd3_pipe.transformer, latents, sd3_pipe.scheduler.timesteps[0], cond)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    assert output.shape == latents.shape and (output - other_t).abs().max() > 1e-3   # the timestep reaches it


def test_decode_and_encode_images_are_sd3s_shifted_and_scaled_vae(sd3_pipe):
    """decode is the end of StableDiffusion3Pipeline.__call__: latents/scaling_factor + shift_factor, then the VAE,
    then [-1, 1] -> [0, 1]; encode_images is its inverse on the posterior mean, so the two compose to the VAE's round
    trip, up to the float32 rounding of shift and scale (an ulp of z, which the random decoder amplifies to ~2e-6)."""
    family, vae = family_of(sd3_pipe), sd3_pipe.vae
    latents, pixels = _noise((2, 16, 16, 16)), _noise((2, 3, 32, 32), seed=1).clamp(-1, 1)
    with torch.no_grad():
        expected = vae.decode(latents / 1.5305 + 0.0609, return_dict=False)[0]
        torch.testing.assert_close(family.decode(latents), (expected / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)
        z = vae.encode(pixels).latent_dist.mean
        torch.testing.assert_close(family.encode_images(pixels), (z - 0.0609) * 1.5305, rtol=0, atol=0)
        round_trip = (vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(family.decode(family.encode_images(pixels)), round_trip, rtol=0, atol=1e-5)


def test_lora_loads_in_plain_diffusers_with_alpha_not_equal_rank_and_resumes_exactly(sd3_pipe, tmp_path):
    """Both streams' attention projections carry the adapter; the saved file, loaded by a fresh pipeline's own
    load_lora_weights, gives the trained transformer's output at scale alpha/rank = 2 (a loader assuming alpha = rank
    would be 2x off), and load_lora restores the adapter bit for bit."""
    family = family_of(sd3_pipe)
    family.add_lora(rank=4, alpha=8, target_modules=family.lora_target_modules)
    perturb_lora(sd3_pipe.transformer, scale=0.1)
    adapted = {name.split(".lora_")[0] for name, _ in sd3_pipe.transformer.named_parameters() if "lora_" in name}
    assert {name.split("attn.")[1] for name in adapted} == {target.removeprefix("attn.")
                                                            for target in family.lora_target_modules}
    assert not any("attn2" in name for name in adapted)   # SD3.5's image-only attention stays frozen, as diffusers'
    cond, _ = family.encode_prompts(PROMPTS, "", 1.0, 32)
    latents, t = _noise((2, 16, 16, 16)), torch.tensor(750.0)
    check_lora_round_trip(family, build_tiny_sd3_pipeline, latents, t, cond, tmp_path)


def test_saved_tiny_sd3_loads_from_its_folder(sd3_pipe, tmp_path):
    """model_index.json names StableDiffusion3Pipeline; the offline T5 tokenizer saves and loads with the rest."""
    sd3_pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path))
    assert type(loaded).__name__ == "StableDiffusion3Pipeline"
    assert isinstance(family_of(loaded), StableDiffusion3Family)
    assert loaded.tokenizer_3("a red circle").input_ids == sd3_pipe.tokenizer_3("a red circle").input_ids
    original = family_of(sd3_pipe).encode_prompts(PROMPTS, "", 1.0, 32)[0]
    reloaded = family_of(loaded).encode_prompts(PROMPTS, "", 1.0, 32)[0]
    torch.testing.assert_close(reloaded.prompt_embeds, original.prompt_embeds, rtol=0, atol=0)


def test_sd35_medium_random_has_sd35_mediums_shapes_and_sizes():
    """Built on the meta device (shapes only): a prompt runs through the three text encoders, the transformer and
    the VAE at 1024 px, and the sizes match the published ones. The transformer has 2.24 B parameters plus a
    384x384x1536 positional table (a buffer), 2.47 B together: Stability's "2.5 billion". T5's encoder, with T5's
    32,128-token embedding table in place of the offline tokenizer's, is T5-XXL's 4.76 B."""
    with torch.device("meta"):
        pipe = build_random_sd3_pipeline(SD35_MEDIUM_ARCHITECTURE)
    family = family_of(pipe)
    cond, _ = family.encode_prompts(["a red circle"], "", 1.0, 1024)
    assert cond.prompt_embeds.shape == (1, CLIP_TOKENS + T5_TOKENS, 4096)   # 768 + 1280 CLIP widths padded to T5's
    assert cond.pooled_prompt_embeds.shape == (1, 768 + 1280)
    latents = torch.empty(family.latent_shape(1, 1024), device="meta")
    assert latents.shape == (1, 16, 128, 128)
    assert family.denoise(pipe.transformer, latents, torch.tensor(1000.0), cond).shape == latents.shape
    assert family.decode(latents).shape == (1, 3, 1024, 1024)

    def size(module):
        return sum(p.numel() for p in module.parameters())

    transformer = size(pipe.transformer) + sum(b.numel() for b in pipe.transformer.buffers())
    assert round(transformer / 1e8) == 25
    t5 = size(pipe.text_encoder_3) + (32128 - len(pipe.tokenizer_3)) * 4096
    assert round(t5 / 1e7) == 476
