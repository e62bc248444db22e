"""Model families plug in through diffrl.families.FAMILIES: a family defined here, with a conditioning object of its
own, samples what the built-in SD family samples and trains under a trainer, without any change to diffrl's files."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from diffusers import StableDiffusionPipeline
from torch import Tensor

from diffrl.errors import UserInputError
from diffrl.families import FAMILIES, StableDiffusionFamily, family_of
from diffrl.models import BUILTIN_MODELS, build_tiny_pipeline
from diffrl.sampler import SDSampler
from diffrl.training import build_run
from diffrl.transitions import KERNELS
from tests.fixtures import fast_config, lora_state
from tests.test_transitions import SharpDDIMKernel

PROMPTS = ["a red circle", "a blue square"]


class WrappedPipeline(StableDiffusionPipeline):
    """SD 1.x under another class name, as a user's own pipeline subclass would be."""


@dataclass
class HiddenStates:
    """A conditioning object unlike diffrl's TextConditioning: only the text encoder's hidden states."""

    prompt_embeds: Tensor

    def __len__(self) -> int:
        return len(self.prompt_embeds)

    def __getitem__(self, rows) -> HiddenStates:
        return HiddenStates(self.prompt_embeds[rows])

    def repeat(self, n: int) -> HiddenStates:
        return HiddenStates(self.prompt_embeds.repeat(n, 1, 1))

    @classmethod
    def cat(cls, parts: list[HiddenStates]) -> HiddenStates:
        return cls(torch.cat([part.prompt_embeds for part in parts]))


class WrappedFamily:
    """A family adapter written outside diffrl: its own conditioning, SD's VAE and LoRA handling by delegation."""

    name = "wrapped-sd"
    description = "SD 1.x with HiddenStates conditioning (a test family)"
    pipeline_classes = ("WrappedPipeline",)
    lora_target_modules = ("to_q", "to_v")
    upcasts_fp16_vae = False
    default_scheduler = "ddim"
    guidance = "cfg"
    denoiser_calls = 0

    def __init__(self, pipe):
        self.sd = StableDiffusionFamily(pipe)
        self.denoiser, self.vae = self.sd.denoiser, self.sd.vae
        for name in ("default_resolution", "latent_shape", "frozen_modules", "encode_images", "decode", "add_lora",
                     "save_lora", "load_lora", "timestep_kwargs", "initial_latents"):
            setattr(self, name, getattr(self.sd, name))

    def encode_prompts(self, prompts, negative_prompt, guidance_scale, resolution):
        cond, uncond = self.sd.encode_prompts(prompts, negative_prompt, guidance_scale, resolution)
        return HiddenStates(cond.prompt_embeds), None if uncond is None else HiddenStates(uncond.prompt_embeds)

    def as_conditioning(self, value):
        return value if isinstance(value, HiddenStates) else HiddenStates(value)

    def denoise(self, denoiser, latents, t, conditioning):
        assert isinstance(conditioning, HiddenStates), type(conditioning)   # no path swapped in another object
        type(self).denoiser_calls += 1
        return denoiser(latents, t, encoder_hidden_states=conditioning.prompt_embeds, return_dict=False)[0]


def build_wrapped_tiny() -> WrappedPipeline:
    return WrappedPipeline(**build_tiny_pipeline().components, requires_safety_checker=False)


@pytest.fixture
def wrapped_family(monkeypatch):
    monkeypatch.setitem(FAMILIES, WrappedFamily.name, WrappedFamily)
    monkeypatch.setattr(WrappedFamily, "denoiser_calls", 0)
    return WrappedFamily


def test_the_most_derived_pipeline_class_picks_the_family(tiny_pipe, wrapped_family):
    assert isinstance(family_of(build_wrapped_tiny()), WrappedFamily)
    assert isinstance(family_of(tiny_pipe), StableDiffusionFamily)   # the base class keeps its own family
    with pytest.raises(UserInputError, match="no model family for a object; it samples .*StableDiffusionPipeline"):
        family_of(object())


def test_a_family_from_outside_samples_what_the_built_in_family_samples(tiny_pipe, wrapped_family):
    """Same weights, same noise: the test family's images and log-probs equal the SD family's, bit for bit."""
    wrapped = SDSampler(build_wrapped_tiny(), num_steps=4, guidance_scale=4.0, eta=1.0)
    builtin = SDSampler(tiny_pipe, num_steps=4, guidance_scale=4.0, eta=1.0)
    ours, theirs = (sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
                    for sampler in (wrapped, builtin))
    assert isinstance(ours.conditioning, HiddenStates) and wrapped_family.denoiser_calls == 4
    assert torch.equal(ours.images, theirs.images) and torch.equal(ours.log_probs, theirs.log_probs)
    assert torch.equal(wrapped.log_prob(ours, 2), builtin.log_prob(theirs, 2))


def test_a_trainer_runs_on_a_family_and_a_kernel_from_outside(tmp_path, monkeypatch, wrapped_family):
    """DDPO (recomputed log-probs on row subsets of the conditioning, CFG) trains two steps on the test family
    sampled by the test kernel, loaded by name as a built-in model; the LoRA moves and the metrics are finite."""
    monkeypatch.setitem(BUILTIN_MODELS, "tiny-wrapped", (build_wrapped_tiny, "a test model"))
    monkeypatch.setitem(KERNELS, "sharp_ddim", SharpDDIMKernel)
    run = build_run(fast_config("model=tiny-wrapped", "trainer=ddpo", "sample.scheduler=sharp_ddim",
                                "sample.eta=1.0", "sample.batch_size=2", "ddpo.train_batch_size=2"), tmp_path)
    assert isinstance(run.sampler.family, WrappedFamily) and run.sampler.kernel.name == "sharp_ddim"
    initial = lora_state(run.pipe.unet)
    metrics = [run.trainer.step(PROMPTS) for _ in range(2)]
    assert all(math.isfinite(value) for step in metrics for value in step.values()), metrics
    assert max((p - initial[n]).abs().max().item() for n, p in lora_state(run.pipe.unet).items()) > 0
    assert wrapped_family.denoiser_calls > 2 * 4   # sampling and the recomputed steps both went through it
