"""The FLUX.1 family adapter on the built-in tiny-flux, each part against diffusers' FluxPipeline written out by hand:
prompt encoding with the distilled guidance scale, the transformer call on packed latents, the VAE's shift-and-scale
around the 2x2 (un)packing, the pipeline's dynamically shifted timesteps, whole samples equal to FluxPipeline's, and
the LoRA file read by the plain pipeline with alpha ≠ rank. flux-dev-random's configs are checked on the meta device
(no memory, no compute)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from diffrl.errors import UserInputError
from diffrl.families import FluxConditioning, FluxFamily, family_of
from diffrl.models import (FLUX_DEV_ARCHITECTURE, TINY_FLUX_ARCHITECTURE, build_random_flux_pipeline,
                           build_tiny_flux_pipeline, load_pipeline)
from diffrl.sampler import SDSampler
from tests.conftest import PROMPTS, perturb_lora
from tests.fixtures import check_lora_round_trip

T5_TOKENS = 512   # FluxPipeline's max_sequence_length: the text sequence is T5's tokens alone
GUIDANCE = 3.5    # FluxPipeline's default guidance_scale


@pytest.fixture
def flux_pipe():
    return build_tiny_flux_pipeline()


@pytest.fixture(scope="module")
def schnell_pipe():
    """FLUX.1-schnell's kind at toy size: no guidance input, the static shift 1 (schnell's scheduler config)."""
    architecture = {**TINY_FLUX_ARCHITECTURE,
                    "transformer": {**TINY_FLUX_ARCHITECTURE["transformer"], "guidance_embeds": False}}
    pipe = build_random_flux_pipeline(architecture, seed=1)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return pipe


def _noise(shape, seed: int = 0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _image_ids(side: int) -> torch.Tensor:
    """[side², 3] position ids (0, row, column) of the packed grid, row-major, as FluxPipeline lays them out."""
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).float()


def test_tiny_flux_builds_offline_as_the_flux_family():
    """Built from configs (the conftest sets HF_HUB_OFFLINE), seeded without touching the global RNG; FLUX's VAE
    constants, dynamic shifting and guidance embedding; 32 px images whose 16x16x16 latents pack into 64 tokens."""
    rng = torch.get_rng_state()
    pipe = load_pipeline("tiny-flux")
    assert torch.equal(torch.get_rng_state(), rng)
    assert isinstance(pipe, FluxPipeline) and pipe.transformer.config.guidance_embeds
    assert not any(model.training for model in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2))
    family = family_of(pipe)
    assert isinstance(family, FluxFamily) and family.denoiser is pipe.transformer and family.guidance == "distilled"
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.max_shift == 1.15
    assert family.default_resolution() == 32 and family.latent_shape(2, 32) == (2, 64, 64)
    assert len(family.frozen_modules()) == 3   # the VAE and both text encoders
    with pytest.raises(UserInputError, match="resolution 34 must be a multiple of 4 for this FLUX model"):
        family.latent_shape(1, 34)   # 17x17 latents: no whole 2x2 patches (FluxPipeline would resize to 32)
    same = build_tiny_flux_pipeline()
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), same.transformer.parameters()))


def test_encode_prompts_is_the_pipelines_encode_prompt_with_the_guidance_scale(flux_pipe, schnell_pipe):
    """T5's hidden states and CLIP-L's pooled output, as FluxPipeline.encode_prompt builds them, and the guidance
    scale per row in float32 (FLUX.1-dev), or none (schnell); never an unconditional half."""
    family = family_of(flux_pipe)
    cond, uncond = family.encode_prompts(PROMPTS, "", GUIDANCE, 32)
    with torch.no_grad():
        embeds, pooled, text_ids = flux_pipe.encode_prompt(PROMPTS, None)
    assert uncond is None and isinstance(cond, FluxConditioning)
    assert cond.prompt_embeds.shape == (2, T5_TOKENS, 32) and cond.pooled_prompt_embeds.shape == (2, 32)
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled_prompt_embeds, pooled, rtol=0, atol=0)
    assert cond.guidance.dtype == torch.float32 and cond.guidance.tolist() == [GUIDANCE, GUIDANCE]
    assert torch.equal(text_ids, torch.zeros(T5_TOKENS, 3))
    schnell = family_of(schnell_pipe).encode_prompts(PROMPTS, "", GUIDANCE, 32)[0]
    assert schnell.guidance is None
    with pytest.raises(UserInputError, match="negative_prompt must be empty for FLUX, which is guidance-distilled"):
        family.encode_prompts(PROMPTS, "blurry", GUIDANCE, 32)


def test_conditioning_is_a_batch_and_nothing_else_is_taken(flux_pipe):
    """Row selection, repeat and cat carry the guidance scale with the embeddings (trainers select rows)."""
    family = family_of(flux_pipe)
    cond = family.encode_prompts(PROMPTS, "", GUIDANCE, 32)[0]
    cond.guidance = torch.tensor([1.0, 2.0])
    assert len(cond) == 2 and cond[torch.tensor([1])].guidance.tolist() == [2.0]
    assert cond.repeat(2).guidance.tolist() == [1.0, 2.0, 1.0, 2.0]
    both = FluxConditioning.cat([cond, cond[1:]])
    assert both.guidance.tolist() == [1.0, 2.0, 2.0] and torch.equal(both.prompt_embeds[2], cond.prompt_embeds[1])
    assert family.as_conditioning(cond) is cond
    with pytest.raises(ValueError, match="a FLUX transformer needs the pooled text embeddings and the guidance"):
        family.as_conditioning(cond.prompt_embeds)


@pytest.mark.parametrize("per_row", [False, True])
def test_denoise_is_the_pipelines_transformer_call(flux_pipe, per_row):
    """As FluxPipeline.__call__ calls its transformer: t/1000 broadcast over the batch (or one per row, as a trainer
    recomputing steps of different trajectories passes it), the guidance scale, zero text ids and the (0, row,
    column) ids of the 8x8 packed grid."""
    family = family_of(flux_pipe)
    cond = family.encode_prompts(PROMPTS, "", GUIDANCE, 32)[0]
    latents = _noise((2, 64, 64))
    flux_pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=0.5)
    t = flux_pipe.scheduler.timesteps[1:3] if per_row else flux_pipe.scheduler.timesteps[1]
    with torch.no_grad():
        output = family.denoise(flux_pipe.transformer, latents, t, cond)
        expected = flux_pipe.transformer(hidden_states=latents, timestep=t.expand(2) / 1000, guidance=cond.guidance,
                                         pooled_projections=cond.pooled_prompt_embeds,
                                         encoder_hidden_states=cond.prompt_embeds, txt_ids=torch.zeros(T5_TOKENS, 3),
                                         img_ids=_image_ids(8), return_dict=False)[0]
        other_guidance = family.denoise(flux_pipe.transformer, latents, t,
                                        FluxConditioning(cond.prompt_embeds, cond.pooled_prompt_embeds,
                                                         torch.full([2], 1.0)))
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    assert output.shape == latents.shape and (output - other_guidance).abs().max() > 1e-3   # the guidance reaches it


def test_packing_and_the_vae_are_the_pipelines(flux_pipe):
    """decode is the end of FluxPipeline.__call__: unpack the 2x2 patches, latents/scaling_factor + shift_factor, the
    VAE, [-1, 1] -> [0, 1]; encode_images is the inverse on the posterior mean, then packed. Token (i, j) of the 8x8
    grid holds latent pixels (2i + a, 2j + b) of each channel c at position 4c + 2a + b."""
    family, vae = family_of(flux_pipe), flux_pipe.vae
    latents, pixels = _noise((2, 16, 16, 16)), _noise((2, 3, 32, 32), seed=1).clamp(-1, 1)
    packed = FluxPipeline._pack_latents(latents, 2, 16, 16, 16)
    assert packed[1, 3 * 8 + 5, 4 * 7 + 2 * 1 + 0] == latents[1, 7, 2 * 3 + 1, 2 * 5 + 0]
    with torch.no_grad():
        expected = vae.decode(latents / 0.3611 + 0.1159, return_dict=False)[0]
        torch.testing.assert_close(family.decode(packed), (expected / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)
        z = vae.encode(pixels).latent_dist.mean
        torch.testing.assert_close(family.encode_images(pixels),
                                   FluxPipeline._pack_latents((z - 0.1159) * 0.3611, 2, 16, 16, 16), rtol=0, atol=0)


def test_timestep_kwargs_give_the_pipelines_shifted_schedule(flux_pipe):
    """σ = linspace(1, 1/n, n) shifted by μ = calculate_shift(token count): 64 tokens at 32 px give
    μ = 0.5 + (1.15 − 0.5)·(64 − 256)/(4096 − 256) = 0.4675; 4096 tokens (256 px here, FLUX.1's 1024 px) give
    max_shift 1.15."""
    family = family_of(flux_pipe)
    kwargs = family.timestep_kwargs(4, 32)
    assert kwargs["mu"] == pytest.approx(0.4675, abs=1e-12)
    np.testing.assert_array_equal(kwargs["sigmas"], [1.0, 0.75, 0.5, 0.25])
    assert family.timestep_kwargs(4, 256)["mu"] == pytest.approx(1.15, abs=1e-12)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(flux_pipe.scheduler.config)
    scheduler.set_timesteps(4, **kwargs)
    shifted = np.exp(0.4675) / (np.exp(0.4675) + (1 / np.array([1.0, 0.75, 0.5, 0.25]) - 1))   # time_shift, exp
    torch.testing.assert_close(scheduler.timesteps, torch.tensor(1000 * shifted, dtype=torch.float32))


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_ode_sampling_equals_the_flux_pipeline(flux_pipe, schnell_pipe, variant):
    """Same packed initial latents, same steps: the images agree to 1e-6, and the pipeline steps through the
    sampler's timesteps. The initial latents are the pipeline's own for the same generator (FluxPipeline draws
    unpacked noise and packs it)."""
    pipe = flux_pipe if variant == "dev" else schnell_pipe
    sampler = SDSampler(pipe, num_steps=4, guidance_scale=GUIDANCE, resolution=32)
    assert sampler.kernel.name == "flow_euler" and not sampler.do_cfg
    latents = sampler.initial_latents(2, torch.Generator().manual_seed(0))   # drawn through the family's hook
    expected_latents = pipe.prepare_latents(2, 16, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(0))[0]
    assert torch.equal(latents, expected_latents)
    traj = sampler.sample(PROMPTS, initial_latents=latents)
    assert traj.latents.shape == (2, 5, 64, 64) and traj.negative_conditioning is None and traj.log_probs is None
    timesteps = []

    def record(pipeline, i, t, callback_kwargs):
        timesteps.append(t)
        return callback_kwargs

    reference = FluxPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    expected = reference(PROMPTS, latents=latents.clone(), num_inference_steps=4, guidance_scale=GUIDANCE,
                         output_type="pt", height=32, width=32, callback_on_step_end=record).images
    assert torch.equal(torch.stack(timesteps), sampler.timesteps)
    torch.testing.assert_close(traj.images, expected.float(), rtol=0, atol=1e-6)


def test_sde_log_probs_are_recomputed_exactly(flux_pipe):
    """The sampled log-probs equal the recomputed ones (ratio exactly 1), also for rows taken out of the batch with
    their own guidance scale, as trainers recompute them."""
    sampler = SDSampler(flux_pipe, num_steps=3, guidance_scale=GUIDANCE, scheduler="flow_sde", noise_level=0.7)
    traj = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert sampler.stochastic_steps == [0, 1, 2] and traj.log_probs.shape == (2, 3)
    for i in range(3):
        assert torch.equal(sampler.log_prob(traj, i), traj.log_probs[:, i])
    rows = torch.tensor([2, 0])
    assert torch.equal(sampler.log_prob(traj, rows), traj.log_probs[torch.arange(2), rows])
    one = sampler.transition_log_prob(traj.latents[1:, 1], traj.latents[1:, 2], 1, traj.conditioning[1:])[0]
    assert torch.equal(one, traj.log_probs[1:, 1])


def test_lora_loads_in_plain_diffusers_with_alpha_not_equal_rank_and_resumes_exactly(flux_pipe, tmp_path):
    """The default targets cover both streams' attention and feed-forwards and the single-stream attention; the saved
    file, loaded by a fresh pipeline's own load_lora_weights, gives the trained transformer's output at scale
    alpha/rank = 2, and load_lora restores the adapter bit for bit."""
    family = family_of(flux_pipe)
    family.add_lora(rank=4, alpha=8, target_modules=family.lora_target_modules)
    perturb_lora(flux_pipe.transformer, scale=0.1)
    adapted = {name.split(".lora_")[0] for name, _ in flux_pipe.transformer.named_parameters() if "lora_" in name}
    assert {name.split(".", 2)[2] for name in adapted if name.startswith("transformer_blocks.")} == set(
        family.lora_target_modules)
    assert {name.split(".", 2)[2] for name in adapted if name.startswith("single_transformer_blocks.")} == {
        "attn.to_q", "attn.to_k", "attn.to_v"}
    cond = family.encode_prompts(PROMPTS, "", GUIDANCE, 32)[0]
    latents, t = _noise((2, 64, 64)), torch.tensor(750.0)
    check_lora_round_trip(family, build_tiny_flux_pipeline, latents, t, cond, tmp_path)


def test_flux_dev_random_has_flux_devs_shapes_and_sizes():
    """Built on the meta device (shapes only): a prompt runs through both text encoders, the transformer and the VAE
    at 1024 px (4096 packed tokens, so μ = max_shift), and the transformer has FLUX.1-dev's 11.9 B parameters. T5's
    encoder, with T5's 32,128-token embedding table in place of the offline tokenizer's, is T5-XXL's 4.76 B."""
    with torch.device("meta"):
        pipe = build_random_flux_pipeline(FLUX_DEV_ARCHITECTURE)
    family = family_of(pipe)
    assert family.default_resolution() == 1024 and pipe.vae_scale_factor == 8
    cond, _ = family.encode_prompts(["a red circle"], "", GUIDANCE, 1024)
    assert cond.prompt_embeds.shape == (1, T5_TOKENS, 4096) and cond.pooled_prompt_embeds.shape == (1, 768)
    assert cond.guidance.shape == (1,)
    latents = torch.empty(family.latent_shape(1, 1024), device="meta")
    assert latents.shape == (1, 4096, 64)
    assert family.denoise(pipe.transformer, latents, torch.tensor(1000.0), cond).shape == latents.shape
    assert family.decode(latents).shape == (1, 3, 1024, 1024)
    assert family.timestep_kwargs(28, 1024)["mu"] == pytest.approx(1.15)

    def size(module):
        return sum(p.numel() for p in module.parameters())

    assert round(size(pipe.transformer) / 1e8) == 119
    assert round((size(pipe.text_encoder_2) + (32128 - len(pipe.tokenizer_2)) * 4096) / 1e7) == 476
