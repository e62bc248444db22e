"""Trainers on the built-in tiny-zimage (a single-stream flow-matching transformer that reads captions of their own
lengths) through the same configs as on SD 1.x and tiny-sd3 (tests/trainers/test_flow_trainers.py), DRaFT with LV,
all with classifier-free guidance, so every recomputed step batches both halves' captions in one call."""

from __future__ import annotations

import math

import pytest

from diffrl.training import build_run, prompts_for_step
from tests.fixtures import fast_config, lora_state
from tests.trainers.test_flow_trainers import TRAINERS as FLOW_TRAINERS

ZIMAGE = "model=tiny-zimage"
TRAINERS = {**FLOW_TRAINERS, "draft": ["draft.lv_samples=2"]}   # DRaFT-LV: re-noised copies of [B, C, h, w] latents


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_trainers_take_steps_on_zimage(trainer, tmp_path):
    """Two steps with finite metrics that move the LoRA of the main blocks and both refiners."""
    run = build_run(fast_config(ZIMAGE, f"trainer={trainer}", *TRAINERS[trainer]), tmp_path)
    assert run.sampler.family.name == "zimage" and run.sampler.do_cfg and run.sampler.resolution == 32
    initial = lora_state(run.sampler.network)
    assert {name.split(".")[0] for name in initial} == {"layers", "noise_refiner", "context_refiner"}
    assert any("feed_forward" in name for name in initial)   # the family's default targets
    for step in range(2):
        metrics = run.trainer.step(prompts_for_step(run.prompts, step, run.config.sample.batch_size, seed=0))
        assert all(math.isfinite(value) for value in metrics.values()), metrics
    assert max((p - initial[n]).abs().max().item() for n, p in lora_state(run.sampler.network).items()) > 0
