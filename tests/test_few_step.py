"""Few-step samplers (Euler ancestral as SD-Turbo samples, LCM as LCM-LoRA does, any diffusers scheduler) against
diffusers' own pipelines and schedulers, and their per-step log-probs against the Gaussian density written out."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, LCMScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffrl.errors import UserInputError
from diffrl.lora import add_lora
from diffrl.sampler import SDSampler
from tests.conftest import PROMPTS, perturb_lora

# (sampler name, diffusers class, schedule preset, guidance): SD-Turbo samples without CFG on trailing timesteps;
# LCM-LoRA keeps a small CFG scale.
FEW_STEP = {"euler_ancestral": (EulerAncestralDiscreteScheduler, "trailing", 0.0), "lcm": (LCMScheduler, "model", 1.5)}


def _pipeline_images(pipe, scheduler_cls, preset, guidance, steps, latents, seed):
    """The pipeline's images from the sampler's initial latents: the pipeline gets the same N(0, I) draw (seed 1) and
    multiplies it by init_noise_sigma itself, as the sampler did, so both start from bit-identical latents (dividing
    the sampler's latents by σ ≈ 14.6 and multiplying back would not round-trip exactly)."""
    original = pipe.scheduler
    extra = {"timestep_spacing": "trailing"} if preset == "trailing" else {}
    pipe.scheduler = scheduler_cls.from_config(original.config, **extra)
    latents = randn_tensor(latents.shape, generator=torch.Generator().manual_seed(1), dtype=latents.dtype)
    try:
        return pipe(PROMPTS, latents=latents, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                    generator=torch.Generator().manual_seed(seed)).images
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("pipe_name", ["tiny_pipe", "tiny_v_pipe"])
@pytest.mark.parametrize("name", list(FEW_STEP))
@pytest.mark.parametrize("steps", [1, 4])
def test_few_step_sampler_reproduces_the_diffusers_pipeline(pipe_name, name, steps, request):
    pipe = request.getfixturevalue(pipe_name)
    scheduler_cls, preset, guidance = FEW_STEP[name]
    sampler = SDSampler(pipe, num_steps=steps, guidance_scale=guidance, scheduler=name, schedule=preset)
    latents = sampler.initial_latents(2, torch.Generator().manual_seed(1))
    traj = sampler.sample(PROMPTS, initial_latents=latents, generator=torch.Generator().manual_seed(2))
    expected = _pipeline_images(pipe, scheduler_cls, preset, guidance, steps, latents, seed=2)
    torch.testing.assert_close(traj.images, expected, rtol=0, atol=1e-6)
    assert traj.latents.shape[1] == steps + 1 and traj.images.shape == (2, 3, 32, 32)
    assert sampler.stochastic_steps == list(range(steps - 1))   # the last step returns the clean estimate


def test_any_diffusers_scheduler_samples_like_its_pipeline(tiny_pipe):
    sampler = SDSampler(tiny_pipe, num_steps=5, guidance_scale=3.0, scheduler="DPMSolverMultistepScheduler")
    latents = sampler.initial_latents(2, torch.Generator().manual_seed(1))
    traj = sampler.sample(PROMPTS, initial_latents=latents)
    expected = _pipeline_images(tiny_pipe, DPMSolverMultistepScheduler, "model", 3.0, 5, latents, seed=0)
    torch.testing.assert_close(traj.images, expected, rtol=0, atol=1e-6)
    assert traj.log_probs is None and sampler.stochastic_steps == []
    with pytest.raises(UserInputError, match="DPMSolverMultistepScheduler does not expose"):
        sampler.log_prob(traj, 0)


def _density(x, mean, std):
    """log N(x; mean, std²) per element, averaged per sample, from the formula (no shared code with the sampler)."""
    per_element = -((x - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return per_element.flatten(1).mean(1)


def test_euler_ancestral_log_probs_equal_the_gaussian_density(tiny_pipe):
    """Each step's mean is recovered from diffusers' own scheduler.step (its output minus σ_up times the noise it drew
    from the same seed), and σ_up from k-diffusion's formula; the sampler's log-prob must equal that density."""
    sampler = SDSampler(tiny_pipe, num_steps=3, guidance_scale=0.0, scheduler="euler_ancestral", schedule="trailing")
    traj = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    reference = EulerAncestralDiscreteScheduler.from_config(tiny_pipe.scheduler.config, timestep_spacing="trailing")
    reference.set_timesteps(3)
    sigmas = reference.sigmas.tolist()
    for i in sampler.stochastic_steps:
        x = traj.latents[:, i]
        with torch.no_grad():
            output = tiny_pipe.unet(reference.scale_model_input(x, reference.timesteps[i]), reference.timesteps[i],
                                    encoder_hidden_states=traj.prompt_embeds).sample
        reference._step_index = i
        drawn = reference.step(output, reference.timesteps[i], x, generator=torch.Generator().manual_seed(5)).prev_sample
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        mean = drawn - sigma_up * noise
        torch.testing.assert_close(sampler.log_prob(traj, i), _density(traj.latents[:, i + 1], mean, sigma_up),
                                   rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(traj.log_probs[:, i], sampler.log_prob(traj, i), rtol=0, atol=1e-5)
    assert torch.equal(traj.log_probs[:, -1], torch.zeros(2))   # the deterministic last step has no density


def test_lcm_log_probs_equal_the_gaussian_density(tiny_pipe):
    """LCM re-noises its consistency estimate: x' = √ᾱ' · denoised + √(1 − ᾱ') · z; denoised from diffusers' step."""
    sampler = SDSampler(tiny_pipe, num_steps=3, guidance_scale=0.0, scheduler="lcm")
    traj = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    reference = LCMScheduler.from_config(tiny_pipe.scheduler.config)
    reference.set_timesteps(3)
    for i in sampler.stochastic_steps:
        x, t = traj.latents[:, i], reference.timesteps[i]
        with torch.no_grad():
            output = tiny_pipe.unet(x, t, encoder_hidden_states=traj.prompt_embeds).sample
        reference._step_index = i
        denoised = reference.step(output, t, x, generator=torch.Generator().manual_seed(5)).denoised
        alpha_next = reference.alphas_cumprod[reference.timesteps[i + 1]].item()
        mean, std = math.sqrt(alpha_next) * denoised, math.sqrt(1 - alpha_next)
        torch.testing.assert_close(sampler.log_prob(traj, i), _density(traj.latents[:, i + 1], mean, std),
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", list(FEW_STEP))
def test_few_step_log_probs_are_recomputed_exactly_and_carry_grad(tiny_pipe, name):
    params = add_lora(tiny_pipe.unet, rank=4)
    perturb_lora(tiny_pipe.unet)
    _, preset, guidance = FEW_STEP[name]
    sampler = SDSampler(tiny_pipe, num_steps=4, guidance_scale=guidance, scheduler=name, schedule=preset)
    traj = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    per_sample = sampler.log_prob(traj, torch.tensor([2, 0]))
    torch.testing.assert_close(per_sample.detach(), torch.stack([traj.log_probs[0, 2], traj.log_probs[1, 0]]),
                               rtol=0, atol=1e-5)
    per_sample.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    reference = sampler.transition_log_prob(traj.latents[:, 1], traj.latents[:, 2], 1, traj.prompt_embeds,
                                            traj.negative_prompt_embeds)
    assert torch.isfinite(reference[0]).all()


def test_bad_scheduler_names_and_combinations_are_refused(tiny_pipe):
    with pytest.raises(UserInputError, match="DPMSolverMultistepScheduler.*ddim, euler_ancestral, flow_cps, flow_euler, "
                                             "flow_sde, lcm"):
        SDSampler(tiny_pipe, scheduler="euler")
    with pytest.raises(UserInputError, match="DDIM schedule"):
        SDSampler(tiny_pipe, scheduler="lcm", schedule="adjoint_matching")
