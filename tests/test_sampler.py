"""SDSampler against diffusers' own pipeline, trajectory shapes, log-prob recomputation and the K-step graph."""

from __future__ import annotations

import pytest
import torch

from diffrl.lora import add_lora
from diffrl.models import load_pipeline
from diffrl.sampler import SDSampler
from tests.conftest import PROMPTS, perturb_lora


@pytest.mark.parametrize("pipe_name", ["tiny_pipe", "tiny_v_pipe"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_reproduces_diffusers_pipeline(pipe_name, eta, request):
    pipe = request.getfixturevalue(pipe_name)
    sampler = SDSampler(pipe, num_steps=8, guidance_scale=7.5, eta=eta)
    latents = sampler.initial_latents(2, torch.Generator().manual_seed(1))
    traj = sampler.sample(PROMPTS, initial_latents=latents, generator=torch.Generator().manual_seed(2))
    expected = pipe(PROMPTS, latents=latents, num_inference_steps=8, guidance_scale=7.5, eta=eta, output_type="pt",
                    generator=torch.Generator().manual_seed(2)).images
    torch.testing.assert_close(traj.images, expected, rtol=0, atol=1e-6)


def test_negative_prompt_changes_the_unconditional_branch(tiny_pipe):
    latents = SDSampler(tiny_pipe, num_steps=3).initial_latents(2, torch.Generator().manual_seed(0))
    plain = SDSampler(tiny_pipe, num_steps=3, eta=0.0).sample(PROMPTS, initial_latents=latents)
    negative = SDSampler(tiny_pipe, num_steps=3, eta=0.0, negative_prompt="a blue square")
    traj = negative.sample(PROMPTS, initial_latents=latents)
    expected = tiny_pipe(PROMPTS, latents=latents, num_inference_steps=3, eta=0.0, output_type="pt",
                         negative_prompt=["a blue square"] * 2).images
    torch.testing.assert_close(traj.images, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(traj.images, plain.images)


def test_trajectory_contract(tiny_pipe):
    sampler = SDSampler(tiny_pipe, num_steps=5, guidance_scale=5.0, eta=1.0)
    traj = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert traj.latents.shape == (2, 6, 4, 16, 16)
    assert traj.timesteps.shape == (5,) and traj.timesteps[0] > traj.timesteps[-1]
    assert traj.log_probs.shape == (2, 5) and traj.log_probs.dtype == torch.float32
    assert traj.images.shape == (2, 3, 32, 32) and 0 <= traj.images.min() and traj.images.max() <= 1
    assert traj.prompt_embeds.shape == traj.negative_prompt_embeds.shape
    assert not traj.images.requires_grad and traj.noise_preds is None
    assert SDSampler(tiny_pipe, num_steps=5, eta=0.0).sample(PROMPTS).log_probs is None


def test_recomputed_log_probs_equal_sampling_log_probs_before_any_update(tiny_pipe):
    add_lora(tiny_pipe.unet, rank=4)
    perturb_lora(tiny_pipe.unet)
    sampler = SDSampler(tiny_pipe, num_steps=6, guidance_scale=4.0, eta=1.0)
    traj = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    for i in range(6):
        ratio = torch.exp(sampler.log_prob(traj, i) - traj.log_probs[:, i])
        assert torch.equal(ratio, torch.ones(2)), f"step {i}: ratio {ratio}"
    # per-sample step indices (DDPO shuffles timesteps independently per trajectory)
    per_sample = sampler.log_prob(traj, torch.tensor([4, 1]))
    torch.testing.assert_close(per_sample, torch.stack([traj.log_probs[0, 4], traj.log_probs[1, 1]]))


@pytest.mark.parametrize("scheduler, schedule, guidance", [("ddim", "model", 4.0), ("euler_ancestral", "trailing", 1.0),
                                                           ("lcm", "model", 1.5)])
def test_bf16_unet_used_directly_recomputes_every_step_exactly(scheduler, schedule, guidance):
    """A half-precision UNet outside accelerate: sampling (int step index, 0-dim coefficients) and recomputation
    (tensor index, [B, 1, 1, 1] coefficients) both compute the step's Gaussian in float32, so ρ is exactly 1 at every
    stochastic step. (When type promotion decided, the sampling mean was bf16 and the recomputed one float32:
    |ρ − 1| reached 0.16 at DDIM's last step, and Euler ancestral's recomputation fed a float32 input to the bf16
    UNet and failed.)"""
    pipe = load_pipeline("tiny", dtype=torch.bfloat16)
    add_lora(pipe.unet, rank=4)
    perturb_lora(pipe.unet)
    sampler = SDSampler(pipe, num_steps=4, guidance_scale=guidance, eta=1.0, scheduler=scheduler, schedule=schedule)
    traj = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert traj.latents.dtype == torch.bfloat16 and traj.log_probs.dtype == torch.float32
    assert len(sampler.stochastic_steps) >= 3
    for i in sampler.stochastic_steps:
        recomputed = sampler.log_prob(traj, torch.full((len(PROMPTS),), i))
        assert torch.equal(recomputed, traj.log_probs[:, i]), (i, recomputed, traj.log_probs[:, i])


def test_log_prob_carries_grad_to_lora(tiny_pipe):
    params = add_lora(tiny_pipe.unet, rank=4)
    sampler = SDSampler(tiny_pipe, num_steps=4, eta=1.0)
    traj = sampler.sample(PROMPTS)
    sampler.log_prob(traj, 2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def _lora_grads(params):
    return torch.cat([p.grad.flatten() for p in params])


def test_draft_k1_gradient_equals_one_unet_call_on_detached_last_input(tiny_pipe):
    params = add_lora(tiny_pipe.unet, rank=4)
    perturb_lora(tiny_pipe.unet)
    sampler = SDSampler(tiny_pipe, num_steps=5, guidance_scale=3.0, eta=0.0)
    initial = sampler.initial_latents(2, torch.Generator().manual_seed(0)).requires_grad_(True)
    traj = sampler.sample(PROMPTS, grad_last_k=1, initial_latents=initial)
    traj.images.mean().backward()
    through_sampler = _lora_grads(params)
    assert initial.grad is None  # nothing before the last step is in the graph
    assert traj.noise_preds.shape == (2, 1, 4, 16, 16)

    for p in params:
        p.grad = None
    last_input = traj.latents[:, -2].detach()
    step = sampler.step(last_input, 4, traj.prompt_embeds, traj.negative_prompt_embeds)
    sampler.decode(step.prev_latents).mean().backward()
    torch.testing.assert_close(through_sampler, _lora_grads(params))
    assert through_sampler.abs().sum() > 0


def test_deeper_truncation_changes_the_gradient(tiny_pipe):
    params = add_lora(tiny_pipe.unet, rank=4)
    perturb_lora(tiny_pipe.unet)
    sampler = SDSampler(tiny_pipe, num_steps=4, eta=0.0)
    latents = sampler.initial_latents(2, torch.Generator().manual_seed(0))
    grads = []
    for k in (1, 4):
        for p in params:
            p.grad = None
        sampler.sample(PROMPTS, grad_last_k=k, initial_latents=latents).images.mean().backward()
        grads.append(_lora_grads(params))
    assert not torch.allclose(grads[0], grads[1])


def test_checkpointed_and_plain_graphs_give_the_same_gradient(tiny_pipe):
    """Checkpointing recomputes the same forward on the same shapes, so the gradients are bit-identical."""
    params = add_lora(tiny_pipe.unet, rank=4)
    perturb_lora(tiny_pipe.unet)
    grads = []
    for checkpointing in (True, False):
        sampler = SDSampler(tiny_pipe, num_steps=3, eta=0.0, gradient_checkpointing=checkpointing)
        if not checkpointing:   # the first sampler switched the shared VAE's own checkpointing on
            tiny_pipe.vae.disable_gradient_checkpointing()
        assert tiny_pipe.vae.is_gradient_checkpointing == checkpointing
        latents = sampler.initial_latents(2, torch.Generator().manual_seed(0))
        for p in params:
            p.grad = None
        sampler.sample(PROMPTS, grad_last_k=2, initial_latents=latents).images.mean().backward()
        grads.append(_lora_grads(params))
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


def test_reference_prediction_disables_the_adapter(tiny_pipe):
    from diffrl.models import build_tiny_pipeline

    base = build_tiny_pipeline()
    add_lora(tiny_pipe.unet, rank=4)
    perturb_lora(tiny_pipe.unet)
    sampler = SDSampler(tiny_pipe, num_steps=4)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds, negative = sampler.encode_prompts(PROMPTS)
    t = sampler.timesteps[1]
    with torch.no_grad():
        adapted = sampler.predict_noise(latents, t, embeds, negative_prompt_embeds=negative)
        reference = sampler.predict_noise(latents, t, embeds, negative_prompt_embeds=negative, reference=True)
        base_eps = SDSampler(base, num_steps=4).predict_noise(latents, t, embeds, negative_prompt_embeds=negative)
    torch.testing.assert_close(reference, base_eps)
    assert not torch.allclose(adapted, reference, atol=1e-4)
    assert tiny_pipe.unet.active_adapters()  # re-enabled afterwards


def test_bad_sampler_settings_are_refused(tiny_pipe):
    with pytest.raises(ValueError, match="eta"):
        SDSampler(tiny_pipe, eta=1.5)
    with pytest.raises(ValueError, match="stochastic"):
        sampler = SDSampler(tiny_pipe, num_steps=2, eta=0.0)
        sampler.log_prob(sampler.sample(PROMPTS), 0)


def test_vae_checkpoints_per_block_only_when_asked(tiny_pipe):
    SDSampler(tiny_pipe, gradient_checkpointing=False)
    assert not tiny_pipe.vae.is_gradient_checkpointing
    SDSampler(tiny_pipe)
    assert tiny_pipe.vae.is_gradient_checkpointing  # acts only under grad: no-grad decoding is unchanged
