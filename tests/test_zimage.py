"""The Z-Image family adapter on the built-in tiny-zimage, each part against diffusers' ZImagePipeline written out by
hand: the offline Qwen tokenizer and chat template, prompt encoding (captions of their own lengths), the transformer
call (time 1 − σ, frames as a list, output negated), FLUX's VAE constants, the pipeline's timesteps, whole samples
equal to ZImagePipeline's with its guidance scale s as the sampler's s + 1, and the LoRA file read by the plain
pipeline with alpha ≠ rank."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

from diffrl.errors import UserInputError
from diffrl.families import ZImageConditioning, ZImageFamily, family_of
from diffrl.models import build_tiny_zimage_pipeline, load_pipeline
from diffrl.sampler import SDSampler
from tests.conftest import PROMPTS, perturb_lora
from tests.fixtures import check_lora_round_trip

TOKENS = 512      # ZImagePipeline's max_sequence_length: captions are padded to it here, cut back to their own length
SCALE = 4.0       # ZImagePipeline's guidance_scale s (its CFG: pos + s·(pos − neg))
GUIDANCE = 5.0    # the sampler's w = s + 1 (uncond + w·(cond − uncond))


@pytest.fixture
def zimage_pipe():
    return build_tiny_zimage_pipeline()


def _noise(shape, seed: int = 0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _pipeline_captions(pipe, prompts, negative=None):
    """ZImagePipeline.encode_prompt with CFG: lists of [L_i, D] caption features (it rewrites the lists it gets)."""
    with torch.no_grad():
        return pipe.encode_prompt(list(prompts), do_classifier_free_guidance=True,
                                  negative_prompt=None if negative is None else [negative] * len(prompts))


def test_tiny_zimage_builds_offline_as_the_zimage_family():
    """Built from configs (the conftest sets HF_HUB_OFFLINE), seeded without touching the global RNG; FLUX.1's VAE
    constants, Z-Image-Turbo's static shift 3; 32 px images whose 16x16x16 latents the transformer cuts into 2x2
    patches."""
    rng = torch.get_rng_state()
    pipe = load_pipeline("tiny-zimage")
    assert torch.equal(torch.get_rng_state(), rng)
    assert isinstance(pipe, ZImagePipeline) and type(pipe.text_encoder).__name__ == "Qwen3Model"
    assert type(pipe.tokenizer).__name__ == "Qwen2Tokenizer"
    assert not any(model.training for model in (pipe.transformer, pipe.vae, pipe.text_encoder))
    family = family_of(pipe)
    assert isinstance(family, ZImageFamily) and family.denoiser is pipe.transformer and family.guidance == "cfg"
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert family.default_resolution() == 32 and family.latent_shape(2, 32) == (2, 16, 16, 16)
    assert len(family.frozen_modules()) == 2   # the VAE and the text encoder
    with pytest.raises(UserInputError, match="resolution 34 must be a multiple of 4 for this Z-Image model"):
        family.latent_shape(1, 34)   # 17x17 latents: no whole 2x2 patches (ZImagePipeline raises too)
    del pipe.default_sample_size
    assert family.default_resolution() == 1024   # ZImagePipeline's own default
    same = build_tiny_zimage_pipeline()
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), same.transformer.parameters()))


def test_offline_tokenizer_reads_the_chat_template_as_qwen_does(zimage_pipe):
    """The chat template ZImagePipeline renders ("<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n"),
    its markers single special tokens, known words single tokens after a space, anything else in bytes; right
    padding with <|endoftext|> to max_length, as the pipeline asks."""
    tokenizer = zimage_pipe.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a red circle"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|im_start|>", "user", "Ċ", "a", "Ġred", "Ġcircle",
                                                    "<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
    assert tokenizer.decode(tokenizer("zebras ünïcode 42!").input_ids) == "zebras ünïcode 42!"
    padded = tokenizer([text], padding="max_length", max_length=TOKENS, truncation=True)
    assert padded.attention_mask[0] == [1] * len(ids) + [0] * (TOKENS - len(ids))
    assert set(padded.input_ids[0][len(ids):]) == {tokenizer.convert_tokens_to_ids("<|endoftext|>")}


def test_encode_prompts_is_the_pipelines_encode_prompt(zimage_pipe):
    """Qwen3's second-to-last hidden states of each prompt's own tokens, as ZImagePipeline.encode_prompt returns them,
    padded into [B, 512, D] with a mask; the unconditional half is "" in the chat template (or the negative prompt),
    and there is none without CFG (the sampler's w ≤ 1, the pipeline's s ≤ 0)."""
    family = family_of(zimage_pipe)
    cond, uncond = family.encode_prompts(PROMPTS, "", GUIDANCE, 32)
    embeds, negative_embeds = _pipeline_captions(zimage_pipe, PROMPTS)
    assert isinstance(cond, ZImageConditioning) and cond.prompt_embeds.shape == (2, TOKENS, 32)
    assert [len(caption) for caption in embeds] == cond.prompt_mask.sum(dim=1).tolist() == [11, 13]
    for mine, theirs in zip(cond.captions() + uncond.captions(), embeds + negative_embeds):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert not cond.prompt_embeds[~cond.prompt_mask].any()   # zero after each prompt's tokens
    with torch.no_grad():   # the pipeline's features written out: the templated prompt's hidden_states[-2]
        inputs = zimage_pipe.tokenizer(["<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n"],
                                       return_tensors="pt")
        hidden = zimage_pipe.text_encoder(**inputs, output_hidden_states=True).hidden_states[-2][0]
    torch.testing.assert_close(cond.captions()[0], hidden, rtol=0, atol=1e-6)
    negative = family.encode_prompts(PROMPTS, "blurry", GUIDANCE, 32)[1]
    for mine, theirs in zip(negative.captions(), _pipeline_captions(zimage_pipe, PROMPTS, "blurry")[1]):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert family.encode_prompts(PROMPTS, "", 1.0, 32)[1] is None


def test_conditioning_is_a_batch_and_nothing_else_is_taken(zimage_pipe):
    """Row selection, repeat and cat carry each row's mask with its embeddings (trainers select rows)."""
    family = family_of(zimage_pipe)
    cond = family.encode_prompts(PROMPTS, "", 1.0, 32)[0]
    assert len(cond) == 2 and cond[torch.tensor([1])].prompt_mask.sum() == 13
    assert cond.repeat(2).prompt_mask.sum(dim=1).tolist() == [11, 13, 11, 13]
    both = ZImageConditioning.cat([cond, cond[1:]])
    assert both.prompt_mask.sum(dim=1).tolist() == [11, 13, 13] and torch.equal(both.captions()[2],
                                                                                cond.captions()[1])
    assert family.as_conditioning(cond) is cond
    with pytest.raises(ValueError, match="a Z-Image transformer needs each prompt's token mask"):
        family.as_conditioning(cond.prompt_embeds)


@pytest.mark.parametrize("per_row", [False, True])
def test_denoise_is_the_pipelines_transformer_call(zimage_pipe, per_row):
    """As ZImagePipeline.__call__ calls its transformer: the time (1000 − t)/1000 broadcast over the batch (or one
    per row, as a trainer recomputing steps of different trajectories passes it), the latents as a list of
    [C, 1, h, w] frames, the captions as a list of their own lengths; the output stacked in float32 and negated into
    the flow velocity."""
    family = family_of(zimage_pipe)
    cond = family.encode_prompts(PROMPTS, "", 1.0, 32)[0]
    captions = _pipeline_captions(zimage_pipe, PROMPTS)[0]
    latents = _noise((2, 16, 16, 16))
    zimage_pipe.scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.5)
    t = zimage_pipe.scheduler.timesteps[1:3] if per_row else zimage_pipe.scheduler.timesteps[1]
    with torch.no_grad():
        output = family.denoise(zimage_pipe.transformer, latents, t, cond)
        frames = [latents[0, :, None], latents[1, :, None]]
        expected = zimage_pipe.transformer(frames, (1000 - t.expand(2)) / 1000, captions, return_dict=False)[0]
        expected = -torch.stack(expected).squeeze(2)
        later = family.denoise(zimage_pipe.transformer, latents, zimage_pipe.scheduler.timesteps[3], cond)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    assert output.shape == latents.shape and (output - later).abs().max() > 1e-3   # the time reaches it


def test_the_vae_is_the_pipelines(zimage_pipe):
    """decode is the end of ZImagePipeline.__call__: latents/scaling_factor + shift_factor, the VAE, [-1, 1] ->
    [0, 1]; encode_images is the inverse on the posterior mean."""
    family, vae = family_of(zimage_pipe), zimage_pipe.vae
    latents, pixels = _noise((2, 16, 16, 16)), _noise((2, 3, 32, 32), seed=1).clamp(-1, 1)
    with torch.no_grad():
        expected = vae.decode(latents / 0.3611 + 0.1159, return_dict=False)[0]
        torch.testing.assert_close(family.decode(latents), (expected / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)
        z = vae.encode(pixels).latent_dist.mean
        torch.testing.assert_close(family.encode_images(pixels), (z - 0.1159) * 0.3611, rtol=0, atol=0)


def test_timestep_kwargs_give_the_pipelines_schedule(zimage_pipe):
    """σ = linspace(1, 1/n, n) in float32 and μ = calculate_shift(count of 2x2 patches): 64 at 32 px give
    μ = 0.5 + (1.15 − 0.5)·(64 − 256)/(4096 − 256) = 0.4675. Z-Image-Turbo's static shift 3 ignores μ:
    σ' = 3σ/(1 + 2σ)."""
    family = family_of(zimage_pipe)
    kwargs = family.timestep_kwargs(4, 32)
    assert kwargs["mu"] == pytest.approx(0.4675, abs=1e-12) and kwargs["sigmas"] == [1.0, 0.75, 0.5, 0.25]
    thirds = family.timestep_kwargs(3, 32)["sigmas"]   # linspace in float32, as the pipeline makes it
    assert thirds == torch.linspace(1.0, 1 / 3, 3).tolist()
    assert thirds != torch.linspace(1.0, 1 / 3, 3, dtype=torch.float64).tolist()
    assert family.timestep_kwargs(4, 64)["mu"] == pytest.approx(0.5, abs=1e-12)     # 32x32 latents: 256 patches
    assert family.timestep_kwargs(4, 256)["mu"] == pytest.approx(1.15, abs=1e-12)   # 128x128 latents: 4096 patches
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(zimage_pipe.scheduler.config)
    scheduler.set_timesteps(4, **kwargs)
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(scheduler.timesteps, 1000 * 3 * sigmas / (1 + 2 * sigmas))


@pytest.mark.parametrize("variant", ["cfg", "turbo", "dynamic_shift"])
def test_ode_sampling_equals_the_zimage_pipeline(zimage_pipe, variant):
    """Same generator, same steps: the images agree to 1e-6, and the pipeline steps through the sampler's timesteps.
    The sampler's w = 5 is the pipeline's s = 4 (pos + 4·(pos − neg) = neg + 5·(pos − neg)); Z-Image-Turbo's s = 0
    (no CFG) is w = 1; a dynamically shifted scheduler takes μ from the patch count."""
    scale = 0.0 if variant == "turbo" else SCALE
    if variant == "dynamic_shift":
        zimage_pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                                max_shift=1.15)
    sampler = SDSampler(zimage_pipe, num_steps=4, guidance_scale=scale + 1, resolution=32)
    assert sampler.kernel.name == "flow_euler" and sampler.do_cfg == (variant != "turbo")
    latents = sampler.initial_latents(2, torch.Generator().manual_seed(0))   # drawn through the family's hook
    expected_latents = zimage_pipe.prepare_latents(2, 16, 32, 32, torch.float32, "cpu",
                                                   torch.Generator().manual_seed(0))
    assert torch.equal(latents, expected_latents)
    traj = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert traj.latents.shape == (2, 5, 16, 16, 16) and traj.log_probs is None
    assert (traj.negative_conditioning is None) == (variant == "turbo")
    timesteps = []

    def record(pipeline, i, t, callback_kwargs):
        timesteps.append(t)
        return callback_kwargs

    reference = ZImagePipeline(**zimage_pipe.components)
    reference.set_progress_bar_config(disable=True)
    expected = reference(PROMPTS, num_inference_steps=4, guidance_scale=scale, output_type="pt", height=32, width=32,
                         generator=torch.Generator().manual_seed(0), callback_on_step_end=record).images
    assert torch.equal(torch.stack(timesteps), sampler.timesteps)
    torch.testing.assert_close(traj.images, expected.float(), rtol=0, atol=1e-6)


def test_sde_log_probs_are_recomputed_exactly(zimage_pipe):
    """With CFG, the sampled log-probs equal the recomputed ones (ratio exactly 1), also for rows taken out of the
    batch with their negative halves, as trainers recompute them."""
    sampler = SDSampler(zimage_pipe, num_steps=3, guidance_scale=GUIDANCE, scheduler="flow_sde", noise_level=0.7)
    traj = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert sampler.stochastic_steps == [0, 1, 2] and traj.log_probs.shape == (2, 3)
    for i in range(3):
        assert torch.equal(sampler.log_prob(traj, i), traj.log_probs[:, i])
    rows = torch.tensor([2, 0])
    assert torch.equal(sampler.log_prob(traj, rows), traj.log_probs[torch.arange(2), rows])
    one = sampler.transition_log_prob(traj.latents[1:, 1], traj.latents[1:, 2], 1, traj.conditioning[1:],
                                      traj.negative_conditioning[1:])[0]
    assert torch.equal(one, traj.log_probs[1:, 1])


def test_lora_loads_in_plain_diffusers_with_alpha_not_equal_rank_and_resumes_exactly(zimage_pipe, tmp_path):
    """The default targets cover the attention and feed-forward of the main blocks and both refiners; the saved file,
    loaded by a fresh pipeline's own load_lora_weights, gives the trained transformer's output at scale
    alpha/rank = 2, and load_lora restores the adapter bit for bit."""
    family = family_of(zimage_pipe)
    family.add_lora(rank=4, alpha=8, target_modules=family.lora_target_modules)
    perturb_lora(zimage_pipe.transformer, scale=0.1)
    adapted = {name.split(".lora_")[0] for name, _ in zimage_pipe.transformer.named_parameters() if "lora_" in name}
    for blocks in ("layers", "noise_refiner", "context_refiner"):
        assert {name.split(".", 2)[2] for name in adapted if name.startswith(f"{blocks}.")} == set(
            family.lora_target_modules)
    assert all(name.split(".")[0] in ("layers", "noise_refiner", "context_refiner") for name in adapted)
    cond = family.encode_prompts(PROMPTS, "", 1.0, 32)[0]
    latents, t = _noise((2, 16, 16, 16)), torch.tensor(750.0)
    check_lora_round_trip(family, build_tiny_zimage_pipeline, latents, t, cond, tmp_path)
