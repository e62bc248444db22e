"""scripts/benchmark.py runs end to end on the tiny model and reports finite, positive ratios."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.fixtures import script_fixture

benchmark_module = script_fixture("benchmark")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield 1
    torch.set_num_threads(threads)


def test_benchmark_tiny_writes_every_ratio_and_finds_no_host_reads_in_the_loops(benchmark_module, one_thread,
                                                                                 tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark_module.main(["--model", "tiny", "--batch-size", "2", "--steps", "3", "--repeats", "1", "--profile",
                           "--threads", str(one_thread), "--json", str(out)])
    report = json.loads(out.read_text())
    expected = ["sampler_over_pipeline", "draft_step_over_sample", "ddpo_train_over_rollout",
                "loop_train_over_rollout", "dpok_step_over_sample", "adjoint_matching_step_over_sample"]
    assert list(report["ratios"]) == expected
    for name, value in report["ratios"].items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
    settings = report["settings"]
    assert (settings["model"], settings["batch_size"], settings["steps"], settings["repeats"]) == ("tiny", 2, 3, 1)
    assert settings["torch"] == torch.__version__ and settings["diffusers"] and settings["device_name"]
    contenders = [report["sampling"][name] for name in ("sampler", "pipeline")]
    contenders += [result[name] for trainer, result in report["trainers"].items()
                   for name in benchmark_module.TRAINER_SETTINGS[trainer][1]]
    assert len(contenders) == 12
    for entry in contenders:
        assert len(entry["seconds"]) == 1 and entry["seconds_per_batch"] > 0 and entry["images_per_second"] > 0
        assert entry["memory"]["cpu_max_rss_mib"] > 0
    assert report["sampling"]["max_abs_image_diff"] < 1e-4  # same latents, same work: same images
    # No .item()-style read inside the denoising loop or DDPO's per-timestep loop: 3 and 6 steps read equally often.
    reads = report["host_reads"]
    assert reads["sample"]["per_step_reads"] == 0 and reads["ddpo_train_pass"]["per_step_reads"] == 0, reads
    printed = capsys.readouterr().out
    assert all(name in printed for name in expected) and "s/batch" in printed and "host reads in sample" in printed


def test_host_reads_counts_item_calls(benchmark_module):
    def three_reads():
        value = torch.zeros(())
        for _ in range(3):
            value = value + torch.ones(()).item()   # one device-to-host read each

    assert benchmark_module.host_reads(three_reads, "cpu") == 3
    assert benchmark_module.host_reads(lambda: torch.ones(4) * 2, "cpu") == 0


def test_unknown_trainer_lists_the_valid_ones(benchmark_module, capsys):
    with pytest.raises(SystemExit):
        benchmark_module.main(["--trainers", "draft,ppo"])
    assert "unknown trainer(s) ppo; choose from draft, ddpo, loop, dpok, adjoint_matching" in capsys.readouterr().err


def test_scaling_sweeps_batch_steps_and_k_relative_to_the_first_row(benchmark_module, one_thread, tmp_path, capsys):
    benchmark_module.SCALING_SWEEPS = {"batch_size": (1, 2), "steps": (2, 4), "k": (1, 2)}
    out = tmp_path / "scaling.json"
    benchmark_module.main(["--scaling", "--model", "tiny", "--batch-size", "1", "--steps", "2", "--repeats", "1",
                           "--threads", str(one_thread), "--json", str(out)])
    rows = json.loads(out.read_text())["scaling"]
    assert [(row["knob"], row["batch_size"], row["steps"], row["k"]) for row in rows] == [
        ("batch_size", 1, 2, 1), ("batch_size", 2, 2, 1), ("steps", 1, 2, 1), ("steps", 1, 4, 1),
        ("k", 1, 2, 1), ("k", 1, 2, 2)]
    for row in rows:
        assert row["step_seconds"] > 0 and row["sample_no_grad_seconds"] > 0 and row["step_peak_mib"] >= 0
    assert rows[0]["step_seconds_relative"] == rows[2]["sample_no_grad_seconds_relative"] == 1.0
    # relative to the sweep's first row (no timing threshold here: timings are the benchmark's job, not a test's)
    assert rows[3]["sample_no_grad_seconds_relative"] == rows[3]["sample_no_grad_seconds"] / rows[2][
        "sample_no_grad_seconds"]
    assert "| sweep | batch | steps | K |" in capsys.readouterr().out
