"""Crash safety: a process killed while writing a checkpoint, corrupt checkpoints found at resume."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffrl.checkpoint import PAUSE_SAVE_AT_STEP, list_checkpoints, recover_interrupted_saves
from diffrl.config import load_config
from diffrl.errors import UserInputError
from diffrl.lora import LORA_WEIGHTS_NAME
from diffrl.models import build_tiny_pipeline
from diffrl.training import train
from tests.fixtures import fast_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "assets" / "configs" / "tiny-draft.yaml"
SHORT = ["train.steps=3", "log.checkpoint_every=1", "log.grid_every=10", "sample.num_steps=2", "sample.batch_size=2",
         "log.grid_prompts=1", "log.grid_seeds=[0]"]


def _wait_for(path: Path, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"{path} did not appear within {seconds} s"
        time.sleep(0.1)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one_and_resume_works(tmp_path, capsys):
    """The test-only hook pauses the save of step 2 after its LoRA file; the process is SIGKILLed there."""
    env = {**os.environ, PAUSE_SAVE_AT_STEP: "2", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "diffrl", "train", str(CONFIG), *SHORT, "--quiet",
                                "--output-dir", str(tmp_path)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "checkpoints" / ".tmp-step-000002"
    try:
        _wait_for(partial / "PAUSED", process, seconds=120)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert (partial / LORA_WEIGHTS_NAME).is_file() and not (partial / "training_state" / "state.json").exists()
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step-000001"]
    build_tiny_pipeline().load_lora_weights(tmp_path / "checkpoints" / "step-000001")  # intact and loadable

    train(load_config(CONFIG, SHORT), tmp_path, resume=True, quiet=True)
    assert "removed .tmp-step-000002, a checkpoint whose save was interrupted" in capsys.readouterr().err
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step-000001", "step-000002", "step-000003"]
    assert not list((tmp_path / "checkpoints").glob(".*"))
    steps = [line.split(",")[0] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == ['{"step": 1', '{"step": 2', '{"step": 3']


def _lora(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step:06d}" / LORA_WEIGHTS_NAME)


def test_corrupt_latest_checkpoint_is_reported_and_the_previous_one_is_used(tmp_path, capsys):
    overrides = [*SHORT, "train.learning_rate=1.0e-2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(fast_config(*overrides), straight, quiet=True)
    shutil.copytree(straight, resumed)
    truncated = resumed / "checkpoints" / "step-000003" / LORA_WEIGHTS_NAME
    truncated.write_bytes(truncated.read_bytes()[:100])
    train(fast_config(*overrides), resumed, resume=True, quiet=True)
    err = capsys.readouterr().err
    assert "checkpoint step-000003 could not be loaded" in err and "resuming from step-000002" in err
    assert (resumed / "checkpoints" / ".bad-step-000003").is_dir()
    expected, got = _lora(straight, 3), _lora(resumed, 3)  # step 3 trained again from step 2: the same weights
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)


def test_no_loadable_checkpoint_is_a_user_error_naming_each(tmp_path):
    train(fast_config(*SHORT, "train.steps=2"), tmp_path, quiet=True)
    with pytest.raises(UserInputError, match=r"could be loaded with this config's model and adapter: step-000002 \(.*; step-000001 \("):
        train(fast_config(*SHORT, "train.lora_rank=8"), tmp_path, resume=True, quiet=True)  # another adapter
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]  # nothing renamed


def test_a_checkpoint_caught_between_the_two_renames_is_put_back(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / ".old-step-000004").mkdir(parents=True)  # step-000004 moved aside, its replacement not yet in place
    (folder / ".tmp-step-000005").mkdir()
    notes = recover_interrupted_saves(tmp_path)
    assert sorted(path.name for path in folder.iterdir()) == ["step-000004"]
    assert len(notes) == 2 and "restored step-000004" in notes[1]
