"""Transition kernels (diffrl.transitions): the forward process against diffusers' own `add_noise`, and a kernel
defined outside diffrl plugged in through the registry, sampled and trained on without editing diffrl's files."""

from __future__ import annotations

import math

import pytest
import torch

from diffrl.sampler import SDSampler
from diffrl.training import build_run
from diffrl.transitions import KERNELS, DDIMKernel, KernelSettings
from tests.conftest import PROMPTS
from tests.fixtures import fast_config

SETTINGS = {"ddim": ({}, 1.0), "euler_ancestral": ({"schedule": "trailing"}, 0.0), "lcm": ({}, 1.5)}


@pytest.mark.parametrize("name", [name for name, kernel in KERNELS.items() if not kernel.flow_matching])
def test_add_noise_is_the_schedulers_forward_process_at_each_step(tiny_pipe, name):
    """x0 noised to step i's level is diffusers' scheduler.add_noise at timesteps[i] (√ᾱ-space for DDIM and LCM,
    x0 + σ ε for Euler ancestral): the same arithmetic on the same tables, to float32 rounding of one product."""
    options, guidance = SETTINGS[name]
    sampler = SDSampler(tiny_pipe, num_steps=4, guidance_scale=guidance, scheduler=name, **options)
    x0, noise = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i in range(4):
        expected = sampler.scheduler.add_noise(x0, noise, sampler.timesteps[i].repeat(2))
        torch.testing.assert_close(sampler.add_noise(x0, noise, i), expected, rtol=1e-6, atol=1e-6)
        per_sample = sampler.add_noise(x0, noise, torch.tensor([i, 3 - i]))
        torch.testing.assert_close(per_sample[0], expected[0], rtol=1e-6, atol=1e-6)


class SharpDDIMKernel(DDIMKernel):
    """A kernel defined outside diffrl: DDIM at half the configured η (less noise per step)."""

    name = "sharp_ddim"
    description = "DDIM at η / 2 (a test kernel)"

    def __init__(self, scheduler, settings: KernelSettings):
        super().__init__(scheduler, KernelSettings(eta=settings.eta / 2))


def test_a_kernel_from_outside_plugs_in_through_the_registry(tmp_path, monkeypatch):
    monkeypatch.setitem(KERNELS, "sharp_ddim", SharpDDIMKernel)
    run = build_run(fast_config("trainer=pso", "sample.scheduler=sharp_ddim", "sample.eta=1.0", "sample.batch_size=2"),
                    tmp_path)
    sampler = run.sampler
    half = SDSampler(run.pipe, num_steps=4, guidance_scale=4.0, eta=0.5)
    assert sampler.kernel.name == "sharp_ddim" and torch.equal(sampler.stds, half.stds)
    traj = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    recomputed = sampler.log_prob(traj, torch.full((2,), 1))
    assert torch.equal(recomputed, traj.log_probs[:, 1])                    # ρ = 1 before an update
    metrics = [run.trainer.step(PROMPTS) for _ in range(2)]                 # online PSO trains on it
    assert all(math.isfinite(value) for step in metrics for value in step.values())
