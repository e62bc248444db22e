"""SDSampler on a flow-matching family (tiny-sd3): the ODE equals diffusers' StableDiffusion3Pipeline for the same
initial latents, Flow-GRPO's SDE recomputes its own log-probs exactly, and mismatched kernels are refused."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from diffrl.errors import UserInputError
from diffrl.models import build_tiny_sd3_pipeline
from diffrl.sampler import SDSampler
from tests.conftest import PROMPTS


@pytest.fixture(scope="module")
def sd3_pipe():
    return build_tiny_sd3_pipeline()


def _initial_latents(sampler: SDSampler) -> torch.Tensor:
    return sampler.initial_latents(len(PROMPTS), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_ode_sampling_equals_the_sd3_pipeline(sd3_pipe, guidance_scale):
    """Same latents, same steps: the images agree to 1e-6 (the same float32 operations in the same order; the
    pipeline's own decode and ours differ only in where the shift is added, a rounding of one ulp of 1)."""
    sampler = SDSampler(sd3_pipe, num_steps=4, guidance_scale=guidance_scale)
    assert sampler.kernel.name == "flow_euler" and sampler.stochastic_steps == []
    latents = _initial_latents(sampler)
    traj = sampler.sample(PROMPTS, initial_latents=latents)
    expected = StableDiffusion3Pipeline(**sd3_pipe.components)(
        PROMPTS, latents=latents.clone(), num_inference_steps=4, guidance_scale=guidance_scale, output_type="pt",
        height=sampler.resolution, width=sampler.resolution).images
    torch.testing.assert_close(traj.images, expected.float(), rtol=0, atol=1e-6)
    assert traj.log_probs is None


def test_sde_log_probs_are_recomputed_exactly(sd3_pipe):
    """The sampled log-probs equal the recomputed ones (ratio exactly 1), and the SDE's steps are all stochastic."""
    sampler = SDSampler(sd3_pipe, num_steps=3, guidance_scale=4.0, scheduler="flow_sde", noise_level=0.7)
    traj = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert sampler.stochastic_steps == [0, 1, 2] and traj.log_probs.shape == (2, 3)
    for i in range(3):
        assert torch.equal(sampler.log_prob(traj, i), traj.log_probs[:, i])
    rows = torch.tensor([2, 0])
    assert torch.equal(sampler.log_prob(traj, rows), traj.log_probs[torch.arange(2), rows])


def test_training_noise_and_noise_prediction_follow_the_flow(sd3_pipe):
    """x_σ = (1 − σ) x0 + σ ε at timestep t = 1000 σ (diffusers' scale_noise), ε̂ = x + (1 − σ) v̂, and the
    velocity as the training target."""
    sampler = SDSampler(sd3_pipe, num_steps=4, guidance_scale=1.0)
    x0, noise = torch.randn(2, 2, *sampler.latent_shape(1)[1:], generator=torch.Generator().manual_seed(1))
    t = torch.tensor([250.0, 750.0])
    sigma = (t / 1000).view(2, 1, 1, 1)
    torch.testing.assert_close(sampler.add_training_noise(x0, noise, t), (1 - sigma) * x0 + sigma * noise)
    conditioning = sampler.encode_prompts(PROMPTS)[0]
    noisy = sampler.add_training_noise(x0, noise, t)
    with torch.no_grad():
        velocity = sampler.family.denoise(sampler.network, noisy, t, conditioning)
        torch.testing.assert_close(sampler.predict_noise(noisy, t, conditioning), noisy + (1 - sigma) * velocity)
        # Diffusion-DPO's errors on a flow model compare velocities: target ε − x0, prediction v̂ itself
        assert torch.equal(sampler.predict_training_target(noisy, t, conditioning), velocity)
    assert torch.equal(sampler.training_target(x0, noise), noise - x0)


def test_a_diffusion_kernel_on_a_flow_model_is_refused_in_one_sentence(sd3_pipe, tiny_pipe):
    with pytest.raises(UserInputError, match="sample.scheduler=ddim does not fit this model, which is a "
                                             "flow-matching model .sd3.; use one of flow_euler, flow_sde"):
        SDSampler(sd3_pipe, scheduler="ddim")
    with pytest.raises(UserInputError, match="sample.scheduler=flow_sde does not fit this model, which is a "
                                             "diffusion .ε/v-prediction. model .sd.; use one of ddim"):
        SDSampler(tiny_pipe, scheduler="flow_sde")
