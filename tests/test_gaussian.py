"""DDIM step mean/std/log-prob against an independent computation with torch.distributions.Normal."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

from diffrl.gaussian import ddim_mean, ddim_std, gaussian_kl, gaussian_log_prob, x0_eps_from_model_output
from diffrl.sampler import SDSampler
from tests.conftest import PROMPTS


def test_log_prob_is_mean_of_elementwise_normal_density():
    x, mean = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    std = torch.tensor(0.37)
    expected = Normal(mean, std).log_prob(x).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)


def test_log_prob_is_float32_for_half_inputs():
    x, mean = torch.randn(2, 4, 3, 3).half(), torch.randn(2, 4, 3, 3).half()
    assert gaussian_log_prob(x, mean, torch.tensor(0.5).half()).dtype == torch.float32


def test_kl_between_equal_variance_gaussians():
    mean_p, mean_q, std = torch.zeros(1, 2), torch.tensor([[1.0, 3.0]]), torch.tensor(2.0)
    # KL = (μp − μq)² / (2σ²) per element: (1/8 + 9/8) / 2 elements = 0.625
    torch.testing.assert_close(gaussian_kl(mean_p, mean_q, std), torch.tensor([0.625]))


def test_ddim_std_and_mean_by_hand():
    alpha_t, alpha_prev = torch.tensor(0.5), torch.tensor(0.8)
    # σ = η √((1−0.8)/(1−0.5)) √(1 − 0.5/0.8) = 0.5 · √0.4 · √0.375
    std = ddim_std(alpha_t, alpha_prev, eta=0.5)
    torch.testing.assert_close(std, torch.tensor(0.5 * 0.4**0.5 * 0.375**0.5))
    x0, eps = torch.tensor([1.0]), torch.tensor([2.0])
    expected = 0.8**0.5 * 1.0 + (1 - 0.8 - std**2) ** 0.5 * 2.0
    torch.testing.assert_close(ddim_mean(x0, eps, alpha_prev, std), expected.reshape(1))


def test_v_prediction_conversion_inverts_the_definition():
    alpha = torch.tensor(0.3)
    x0, eps = torch.randn(2, 4), torch.randn(2, 4)
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps
    v = alpha.sqrt() * eps - (1 - alpha).sqrt() * x0
    got_x0, got_eps = x0_eps_from_model_output(v, x_t, alpha, "v_prediction")
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)


def independent_step(pipe, sampler, latents, i, cond, uncond, guidance_scale, eta):
    """The DDIM transition written out from the paper's equations and the scheduler's raw alphas."""
    scheduler = sampler.scheduler
    t = int(sampler.timesteps[i])
    prev_t = t - scheduler.config.num_train_timesteps // sampler.num_steps
    alphas = scheduler.alphas_cumprod
    a_t = alphas[t]
    a_prev = alphas[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    with torch.no_grad():
        out_uncond = pipe.unet(latents, t, encoder_hidden_states=uncond).sample
        out_cond = pipe.unet(latents, t, encoder_hidden_states=cond).sample
    out = out_uncond + guidance_scale * (out_cond - out_uncond)
    if scheduler.config.prediction_type == "v_prediction":
        x0 = a_t.sqrt() * latents - (1 - a_t).sqrt() * out
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * latents
    else:
        eps = out
        x0 = (latents - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
    return mean, sigma, a_prev


@pytest.mark.parametrize("pipe_name", ["tiny_pipe", "tiny_v_pipe"])
@pytest.mark.parametrize("i", [0, 3, 5])  # 5 is the last step: ᾱ_{t'} must be final_alpha_cumprod
def test_sampler_step_matches_independent_ddim(pipe_name, i, request):
    pipe = request.getfixturevalue(pipe_name)
    sampler = SDSampler(pipe, num_steps=6, guidance_scale=3.0, eta=0.8)
    traj = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    latents = traj.latents[:, i]
    mean, sigma, a_prev = independent_step(pipe, sampler, latents, i, traj.prompt_embeds,
                                           traj.negative_prompt_embeds, 3.0, 0.8)
    if i == 5:
        assert a_prev == sampler.scheduler.alphas_cumprod[0]  # SD's set_alpha_to_one = False
    step = sampler.step(latents, i, traj.prompt_embeds, traj.negative_prompt_embeds)
    torch.testing.assert_close(step.mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step.std, sigma)
    expected = Normal(mean, sigma).log_prob(traj.latents[:, i + 1]).mean(dim=(1, 2, 3))
    torch.testing.assert_close(traj.log_probs[:, i], expected, rtol=1e-4, atol=1e-4)
