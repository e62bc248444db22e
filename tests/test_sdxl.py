"""SDXL in the sampler: the built-in tiny-sdxl against diffusers' own StableDiffusionXLPipeline (DDIM at eta = 0,
SDXL-Turbo's Euler ancestral, LCM with DMD2's explicit timesteps), the pooled embeddings and time ids of each CFG
half, and per-step log-probs against the Gaussian density written out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, LCMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch.distributions import Normal

from diffrl.errors import UserInputError
from diffrl.models import build_tiny_sdxl_pipeline
from diffrl.sampler import SDSampler
from diffrl.trajectory import TextConditioning
from tests.conftest import PROMPTS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sdxl_pipe():
    return build_tiny_sdxl_pipeline()


def _pipeline_images(pipe, scheduler, latents, **call):
    """The pipeline's images from the same N(0, I) draw (seed 1) the sampler scaled into ``latents``; the pipeline
    scales it by init_noise_sigma itself, so both start from bit-identical latents."""
    original, pipe.scheduler = pipe.scheduler, scheduler
    noise = randn_tensor(latents.shape, generator=torch.Generator().manual_seed(1), dtype=latents.dtype)
    try:
        return pipe(PROMPTS, latents=noise, output_type="pt", **call).images
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("negative_prompt", ["", "blurry, low quality"])
def test_eta0_reproduces_the_sdxl_pipeline_with_ddim(sdxl_pipe, negative_prompt):
    """An empty negative prompt is SDXL's zeroed unconditional embedding (force_zeros_for_empty_prompt); a text one
    is encoded by both text encoders. Either way the images equal the pipeline's."""
    sampler = SDSampler(sdxl_pipe, num_steps=5, guidance_scale=5.0, eta=0.0, negative_prompt=negative_prompt)
    latents = sampler.initial_latents(2, torch.Generator().manual_seed(1))
    traj = sampler.sample(PROMPTS, initial_latents=latents)
    expected = _pipeline_images(sdxl_pipe, DDIMScheduler.from_config(sdxl_pipe.scheduler.config), latents,
                                num_inference_steps=5, guidance_scale=5.0, eta=0.0,
                                negative_prompt=[negative_prompt] * 2 if negative_prompt else None)
    torch.testing.assert_close(traj.images, expected, rtol=0, atol=1e-6)
    assert traj.conditioning.pooled_prompt_embeds.shape == (2, 32) and traj.conditioning.add_time_ids.shape == (2, 6)
    assert traj.log_probs is None
    assert (traj.negative_conditioning.pooled_prompt_embeds == 0).all() == (negative_prompt == "")


def test_each_cfg_half_gets_its_own_pooled_embedding_and_time_ids(sdxl_pipe):
    """The UNet's batch is [unconditional; conditional]; the pooled embedding of each half must follow it. Handing
    the unconditional half the conditional pooled embedding changes the guided output, so the pipeline-equality
    test above would catch it too."""
    sampler = SDSampler(sdxl_pipe, num_steps=3, guidance_scale=5.0, eta=1.0, negative_prompt="blurry")
    cond, uncond = sampler.encode_prompts(PROMPTS)
    seen = []
    handle = sdxl_pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs),
                                                      with_kwargs=True)
    latents = sampler.initial_latents(2, torch.Generator().manual_seed(0))
    try:
        sampler.predict_noise(latents, sampler.timesteps[0], cond, negative_prompt_embeds=uncond)
    finally:
        handle.remove()
    added = seen[0]["added_cond_kwargs"]
    torch.testing.assert_close(added["text_embeds"], torch.cat([uncond.pooled_prompt_embeds,
                                                               cond.pooled_prompt_embeds]))
    torch.testing.assert_close(seen[0]["encoder_hidden_states"], torch.cat([uncond.prompt_embeds,
                                                                            cond.prompt_embeds]))
    assert added["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 4   # (size, crop, target size)
    assert not torch.allclose(uncond.pooled_prompt_embeds, cond.pooled_prompt_embeds)

    wrong = TextConditioning(uncond.prompt_embeds, cond.pooled_prompt_embeds, uncond.add_time_ids)
    right_eps = sampler.predict_noise(latents, sampler.timesteps[0], cond, negative_prompt_embeds=uncond)
    wrong_eps = sampler.predict_noise(latents, sampler.timesteps[0], cond, negative_prompt_embeds=wrong)
    assert (right_eps - wrong_eps).abs().max() > 1e-3


def test_log_probs_equal_the_gaussian_density_written_out(sdxl_pipe):
    """DDIM at eta = 0.8 with CFG: each step's log-prob is N(μ, σ²) with μ from an UNet call built here from the
    pipeline's own encode_prompt output, and the recomputed log_prob equals the recorded one."""
    eta, scale = 0.8, 3.0
    sampler = SDSampler(sdxl_pipe, num_steps=4, guidance_scale=scale, eta=eta)
    traj = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    embeds, negative, pooled, negative_pooled = sdxl_pipe.encode_prompt(PROMPTS, device="cpu",
                                                                        do_classifier_free_guidance=True)
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(2, 1)
    alphas = sampler.scheduler.alphas_cumprod
    for i, t in enumerate(traj.timesteps.tolist()):
        x = traj.latents[:, i]
        with torch.no_grad():
            def eps_of(e, p):
                return sdxl_pipe.unet(x, t, encoder_hidden_states=e,
                                      added_cond_kwargs={"text_embeds": p, "time_ids": time_ids}).sample
            eps_uncond, eps_cond = eps_of(negative, negative_pooled), eps_of(embeds, pooled)
        eps = eps_uncond + scale * (eps_cond - eps_uncond)
        a_t = alphas[t]
        a_prev = alphas[t - 1000 // 4] if t - 1000 // 4 >= 0 else sampler.scheduler.final_alpha_cumprod
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
        expected = Normal(mean, sigma).log_prob(traj.latents[:, i + 1]).mean(dim=(1, 2, 3))
        torch.testing.assert_close(traj.log_probs[:, i], expected, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(sampler.log_prob(traj, i), traj.log_probs[:, i], rtol=1e-5, atol=1e-5)


# SDXL-Turbo: Euler ancestral on trailing timesteps without CFG; DMD2: LCM steps at explicit timesteps.
FEW_STEP = {
    "sdxl_turbo": (dict(scheduler="euler_ancestral", schedule="trailing", num_steps=4, guidance_scale=0.0),
                   EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"},
                   dict(num_inference_steps=4, guidance_scale=0.0)),
    "dmd2": (dict(scheduler="lcm", timesteps=[999, 749, 499, 249], guidance_scale=0.0), LCMScheduler, {},
             dict(timesteps=[999, 749, 499, 249], guidance_scale=0.0)),
}


@pytest.mark.parametrize("student", list(FEW_STEP))
def test_few_step_students_reproduce_the_sdxl_pipeline(sdxl_pipe, student):
    settings, scheduler_cls, scheduler_config, call = FEW_STEP[student]
    sampler = SDSampler(sdxl_pipe, **settings)
    latents = sampler.initial_latents(2, torch.Generator().manual_seed(1))
    traj = sampler.sample(PROMPTS, initial_latents=latents, generator=torch.Generator().manual_seed(2))
    scheduler = scheduler_cls.from_config(sdxl_pipe.scheduler.config, **scheduler_config)
    expected = _pipeline_images(sdxl_pipe, scheduler, latents, generator=torch.Generator().manual_seed(2), **call)
    torch.testing.assert_close(traj.images, expected, rtol=0, atol=1e-6)
    assert sampler.stochastic_steps == [0, 1, 2] and traj.log_probs.shape == (2, 4)
    assert traj.log_probs[:, 3].eq(0).all() and traj.log_probs[:, :3].ne(0).all()
    if student == "dmd2":
        assert traj.timesteps.tolist() == [999, 749, 499, 249]


def test_sdxl_refuses_bare_text_embeddings(sdxl_pipe):
    sampler = SDSampler(sdxl_pipe, num_steps=2, guidance_scale=0.0)
    traj = sampler.sample(PROMPTS[:1])
    with pytest.raises(ValueError, match="pooled text embeddings"):
        sampler.predict_noise(traj.latents[:, 0], traj.timesteps[0], traj.prompt_embeds)


def test_explicit_timesteps_need_lcm(sdxl_pipe):
    with pytest.raises(UserInputError, match="sample.scheduler=lcm"):
        SDSampler(sdxl_pipe, scheduler="ddim", timesteps=[999, 499])


def test_train_and_evaluate_an_sdxl_config_end_to_end(tmp_path):
    """`diffrl train` on the shipped tiny-sdxl config writes the run folder; the LoRA loads into plain diffusers'
    StableDiffusionXLPipeline and changes its UNet; `diffrl evaluate` samples the run with SDXL conditioning."""
    from diffrl.cli import main

    config = str(ROOT / "assets" / "configs" / "tiny-sdxl-draft.yaml")
    run = tmp_path / "run"
    assert main(["train", config, "train.steps=2", "sample.num_steps=3", "log.checkpoint_every=2",
                 "log.grid_prompts=1", "log.grid_seeds=[0]", "--quiet", "--output-dir", str(run)]) == 0
    checkpoint = run / "checkpoints" / "step-000002"
    assert (run / "grids" / "step-000002.png").is_file() and len((run / "metrics.jsonl").read_text().split()) >= 2
    plain = build_tiny_sdxl_pipeline()
    sampler = SDSampler(plain, num_steps=3, guidance_scale=4.0, eta=0.0)
    latents = sampler.initial_latents(2, torch.Generator().manual_seed(0))
    base = sampler.sample(PROMPTS, initial_latents=latents).images
    plain.load_lora_weights(str(checkpoint))
    assert (sampler.sample(PROMPTS, initial_latents=latents).images - base).abs().max() > 1e-4
    assert main(["evaluate", str(run), "--samples-per-prompt", "2", "--num-prompts", "1", "--diversity", "pixel",
                 "--quiet", "--output-dir", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())["checkpoints"]
    assert [row["step"] for row in rows] == [0, 2]


def _unet_output(pipe):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    conditioning = TextConditioning(torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)),
                                    torch.randn(2, 32, generator=torch.Generator().manual_seed(2)),
                                    torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2))
    with torch.no_grad():
        return pipe.unet(x, 500, encoder_hidden_states=conditioning.prompt_embeds, return_dict=False,
                         added_cond_kwargs={"text_embeds": conditioning.pooled_prompt_embeds,
                                            "time_ids": conditioning.add_time_ids})[0]


@pytest.mark.parametrize("as_file", [False, True])
def test_base_lora_is_fused_into_the_student_without_an_adapter(tmp_path, as_file):
    """A DMD2/LCM-style LoRA (rank 4, alpha 2) fused by `base_lora` gives the UNet the adapted model's outputs, and
    no adapter remains: the fused model is what "adapters off" (the reference) means during training."""
    from diffrl.lora import add_lora, has_lora, save_lora
    from diffrl.models import load_model
    from tests.conftest import perturb_lora

    source = build_tiny_sdxl_pipeline()
    add_lora(source.unet, rank=4, alpha=2)
    perturb_lora(source.unet)
    path = save_lora(source.unet, tmp_path)
    student = load_model("tiny-sdxl", base_lora=str(path if as_file else tmp_path))
    assert not has_lora(student.unet)
    # fused W + sBA against unfused Wx + sB(Ax): other arithmetic, the same function; compared relative to the LoRA's
    # own effect on the output, which a lost alpha/rank scale (2×) or an unfused LoRA changes by O(1)
    effect = (_unet_output(source) - _unet_output(build_tiny_sdxl_pipeline())).abs().max()
    assert effect > 1e-2
    assert (_unet_output(student) - _unet_output(source)).abs().max() <= 1e-3 * effect


def test_missing_base_lora_says_what_to_give(tmp_path):
    from diffrl.models import load_model

    with pytest.raises(UserInputError, match="base_lora .* does not exist: give a .safetensors file"):
        load_model("tiny-sdxl", base_lora=str(tmp_path / "absent.safetensors"))


def test_fp16_sdxl_decodes_with_a_float32_vae_unless_replaced(tmp_path):
    """diffusers' SDXL pipeline upcasts a force_upcast VAE under fp16; so does a run, unless told otherwise or given
    a VAE that does not need it (the fp16-fixed VAE's config says force_upcast: false)."""
    from diffusers import AutoencoderKL

    from diffrl.models import build_tiny_pipeline, load_model

    pipe = load_model("tiny-sdxl", dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    images = SDSampler(pipe, num_steps=1).decode(torch.zeros(1, 4, 16, 16, dtype=torch.float16))
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert load_model("tiny-sdxl", dtype=torch.float16, vae_float32=False).vae.dtype == torch.float16
    assert load_model("tiny", dtype=torch.float16).vae.dtype == torch.float16      # SD 1.x never upcasts

    config = {key: value for key, value in build_tiny_pipeline().vae.config.items() if not key.startswith("_")}
    fixed = AutoencoderKL.from_config({**config, "force_upcast": False, "scaling_factor": 0.13025})
    fixed.save_pretrained(tmp_path / "vae", safe_serialization=True)
    replaced = load_model("tiny-sdxl", dtype=torch.float16, vae=str(tmp_path / "vae"))
    assert replaced.vae.dtype == torch.float16 and not replaced.vae.config.force_upcast


def test_local_sdxl_folder_loads_as_sdxl(tmp_path, sdxl_pipe):
    """The family comes from model_index.json: a saved tiny-sdxl loads as StableDiffusionXLPipeline, same weights."""
    from diffrl.models import load_pipeline

    sdxl_pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_pipeline(str(tmp_path))
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    torch.testing.assert_close(_unet_output(loaded), _unet_output(sdxl_pipe), rtol=0, atol=0)


def test_folder_of_another_pipeline_class_is_named_in_one_sentence(tmp_path):
    from diffrl.models import load_pipeline

    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLImg2ImgPipeline"}')
    with pytest.raises(UserInputError, match="is a StableDiffusionXLImg2ImgPipeline; diffrl fine-tunes text-to-image "
                                             "StableDiffusionPipeline, StableDiffusionXLPipeline, "
                                             "StableDiffusion3Pipeline, FluxPipeline and ZImagePipeline models"):
        load_pipeline(str(tmp_path))


@pytest.mark.parametrize("keys, pipeline_class", [
    ({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (2,)}, "StableDiffusionXLPipeline"),
    ({"cond_stage_model.transformer.text_model.final_layer_norm.weight": (2,)}, "StableDiffusionPipeline"),
    ({"model.diffusion_model.joint_blocks.37.x_block.mlp.fc1.weight": (2,)}, "StableDiffusion3Pipeline"),  # 3.5 L
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (2,), "guidance_in.in_layer.bias": (2,),
      "img_in.weight": (3, 64)}, "FluxPipeline"),                                                       # FLUX.1-dev
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (2,)}, "FluxPipeline"),                          # schnell
])
def test_single_file_family_is_read_from_tensor_names(tmp_path, keys, pipeline_class):
    """The original Stability / Black Forest Labs layouts, told apart by diffusers' own tensor-name rules."""
    from safetensors.torch import save_file

    from diffrl.models import single_file_pipeline_class

    save_file({key: torch.zeros(shape, dtype=torch.bool) for key, shape in keys.items()}, str(tmp_path / "m.safetensors"))
    assert single_file_pipeline_class(tmp_path / "m.safetensors") == pipeline_class


def test_single_file_of_a_model_type_diffrl_does_not_train_is_refused(tmp_path):
    from safetensors.torch import save_file

    from diffrl.models import single_file_pipeline_class

    save_file({"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2)},
              str(tmp_path / "refiner.safetensors"))
    with pytest.raises(UserInputError, match="holds a 'xl_refiner' checkpoint .* v1, v2, xl_base"):
        single_file_pipeline_class(tmp_path / "refiner.safetensors")


def test_sdxl_lora_round_trip_through_plain_diffusers_keeps_alpha(tmp_path, sdxl_pipe):
    """A LoRA of rank 4 and alpha 2 saved by diffrl, loaded by StableDiffusionXLPipeline.load_lora_weights, gives the
    trained adapter's outputs; with alpha lost (read as alpha = rank) they would be twice as far from the base."""
    from safetensors import safe_open

    from diffrl.lora import add_lora, save_lora
    from tests.conftest import perturb_lora

    add_lora(sdxl_pipe.unet, rank=4, alpha=2)
    perturb_lora(sdxl_pipe.unet)
    path = save_lora(sdxl_pipe.unet, tmp_path)
    plain = build_tiny_sdxl_pipeline()
    base = _unet_output(plain)
    plain.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(_unet_output(plain), _unet_output(sdxl_pipe), rtol=0, atol=1e-5)
    assert (_unet_output(plain) - base).abs().max() > 1e-2
    with safe_open(str(path), framework="pt") as saved:
        assert all(key.startswith("unet.") for key in saved.keys())
        adapter = json.loads(saved.metadata()["lora_adapter_metadata"])
    assert adapter["unet.lora_alpha"] == 2 and adapter["unet.r"] == 4
