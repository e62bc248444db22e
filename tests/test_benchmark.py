"""scripts/benchmark.py runs end to end on the tiny model and reports finite, positive ratios."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from tests.fixtures import load_script


@pytest.fixture
def benchmark_module():
    module = load_script("benchmark")
    yield module
    del sys.modules[module.__name__]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield 1
    torch.set_num_threads(threads)


def test_benchmark_tiny_writes_ratios_and_prints_table(benchmark_module, one_thread, tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark_module.main(["--model", "tiny", "--batch-size", "2", "--steps", "3", "--repeats", "1",
                           "--threads", str(one_thread), "--json", str(out)])
    report = json.loads(out.read_text())
    for name in ("sampler_over_pipeline", "draft_step_over_sample"):
        value = report["ratios"][name]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
    settings = report["settings"]
    assert (settings["model"], settings["batch_size"], settings["steps"], settings["repeats"]) == ("tiny", 2, 3, 1)
    assert settings["torch"] == torch.__version__ and settings["diffusers"] and settings["device_name"]
    for phase, name in (("sampling", "sampler"), ("sampling", "pipeline"), ("training", "draft_step"),
                        ("training", "sample_no_grad")):
        entry = report[phase][name]
        assert len(entry["seconds"]) == 1 and entry["seconds_per_batch"] > 0 and entry["images_per_second"] > 0
        assert entry["memory"]["cpu_max_rss_mib"] > 0
    assert report["sampling"]["max_abs_image_diff"] < 1e-4  # same latents, same work: same images
    printed = capsys.readouterr().out
    assert "sampler_over_pipeline" in printed and "draft_step_over_sample" in printed
    assert "s/batch" in printed and "images/s" in printed
