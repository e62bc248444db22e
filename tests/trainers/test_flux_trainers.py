"""Trainers on the built-in tiny-flux (a guidance-distilled flow-matching transformer on packed latents) through the
same configs as on SD 1.x and tiny-sd3 (tests/trainers/test_flow_trainers.py), DRaFT with LV: re-noised copies of
packed [B, tokens, C] latents. The guidance scale is a transformer input that travels in the conditioning, so every
recomputed step sees the scale it was sampled with."""

from __future__ import annotations

import math

import pytest

from diffrl.training import build_run, prompts_for_step
from tests.fixtures import fast_config, lora_state
from tests.trainers.test_flow_trainers import TRAINERS as FLOW_TRAINERS

FLUX = "model=tiny-flux"
TRAINERS = {**FLOW_TRAINERS, "draft": ["draft.lv_samples=2"]}


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_trainers_take_steps_on_flux(trainer, tmp_path):
    """Two steps with finite metrics that move the LoRA of both streams and the single-stream blocks."""
    run = build_run(fast_config(FLUX, f"trainer={trainer}", *TRAINERS[trainer]), tmp_path)
    assert run.sampler.family.name == "flux" and not run.sampler.do_cfg
    initial = lora_state(run.sampler.network)
    assert any("ff_context" in name for name in initial)   # the family's default targets: the text stream too
    assert any(name.startswith("single_transformer_blocks.") for name in initial)
    for step in range(2):
        metrics = run.trainer.step(prompts_for_step(run.prompts, step, run.config.sample.batch_size, seed=0))
        assert all(math.isfinite(value) for value in metrics.values()), metrics
    assert max((p - initial[n]).abs().max().item() for n, p in lora_state(run.sampler.network).items()) > 0
