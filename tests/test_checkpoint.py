"""Crash safety: a process killed while writing a checkpoint, corrupt checkpoints found at resume, Ctrl-C."""

from __future__ import annotations

import json
import os
import shlex
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
from diffrl.cli import EXIT_INTERRUPTED, main
from diffrl.config import load_config
from diffrl.errors import UserInputError
from diffrl.interruption import TrainingInterrupted
from diffrl.lora import LORA_WEIGHTS_NAME
from diffrl.models import build_tiny_pipeline
from diffrl.training import train
from rewards.statistics import BrightnessReward
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


class CtrlCReward(BrightnessReward):
    """Brightness that presses Ctrl-C (sends this process SIGINT) ``presses[n]`` times during its n-th call. With the
    step-0 grid as call 1, call n + 1 is training step n's reward, in the middle of that step."""

    presses: dict[int, int] = {}

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images, prompts):
        self.calls += 1
        for _ in range(self.presses.get(self.calls, 0)):
            press_ctrl_c()
        return super().forward(images, prompts)


def press_ctrl_c() -> None:
    # Without the loop's handler, SIGINT would stop pytest itself; fail the test instead.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        raise AssertionError("Ctrl-C pressed while the training loop had no Ctrl-C handler")
    signal.raise_signal(signal.SIGINT)


INTERRUPTIBLE = [*SHORT, "log.checkpoint_every=3", "reward=tests.test_checkpoint:CtrlCReward"]
TIMING = {"step_seconds", "samples_per_second"}


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key not in TIMING} for row in rows]


def test_ctrl_c_saves_the_step_in_progress_and_its_resume_command_continues_exactly(tmp_path, monkeypatch, capsys):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(load_config(CONFIG, INTERRUPTIBLE), straight, quiet=True)
    monkeypatch.setattr(CtrlCReward, "presses", {3: 1})   # during step 2, with no checkpoint written yet
    assert main(["train", str(CONFIG), *INTERRUPTIBLE, "--quiet", "--output-dir", str(interrupted)]) == EXIT_INTERRUPTED
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the loop's handler is gone
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("diffrl: Ctrl-C: finishing step 2 and saving it")
    saved = interrupted / "checkpoints" / "step-000002"
    assert err[1].startswith(f"diffrl: interrupted: saved {saved}; continue with: python3 -m diffrl train ")
    assert len(err) == 2 and [path.name for path in list_checkpoints(interrupted)] == ["step-000002"]
    assert [row["step"] for row in _rows(interrupted)] == [1, 2]

    monkeypatch.setattr(CtrlCReward, "presses", {})
    command = shlex.split(err[1].split("continue with: ")[1])
    assert command == ["python3", "-m", "diffrl", "train", str(CONFIG), *INTERRUPTIBLE, "--output-dir",
                       str(interrupted), "--resume", "--quiet"]
    assert main(command[3:]) == 0
    assert "diffrl: resuming from step-000002" in capsys.readouterr().err
    assert _rows(interrupted) == _rows(straight)   # every metric of every step, as in the uninterrupted run
    expected, got = _lora(straight, 3), _lora(interrupted, 3)
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)


def _raise_on_save_of(step_name: str, monkeypatch) -> None:
    """A second Ctrl-C while the checkpoint ``step_name`` is being written (between two of its files)."""
    import diffrl.checkpoint as checkpoint

    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if step_name in str(path) and str(path).endswith("trainer.pt"):
            press_ctrl_c()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)


@pytest.mark.parametrize("second_press", ["mid-step", "mid-save"])
def test_a_second_ctrl_c_stops_at_once_and_saves_nothing_of_the_step(second_press, tmp_path, monkeypatch):
    monkeypatch.setattr(CtrlCReward, "presses", {3: 2 if second_press == "mid-step" else 1})
    if second_press == "mid-save":
        _raise_on_save_of("step-000002", monkeypatch)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(load_config(CONFIG, [*INTERRUPTIBLE, "log.checkpoint_every=1"]), tmp_path, quiet=True)
    kept = tmp_path / "checkpoints" / "step-000001"
    assert not stopped.value.saved and stopped.value.checkpoint == kept
    assert str(stopped.value).startswith(f"stopped before step 2 was saved; the last checkpoint is {kept}")
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step-000001"]
    assert not list((tmp_path / "checkpoints").glob(".*"))   # a save cut short leaves no temporary folder
    # mid-step, step 2 never finished; mid-save, it finished and was logged, and resuming drops its row
    assert [row["step"] for row in _rows(tmp_path)] == ([1] if second_press == "mid-step" else [1, 2])
    optimizer = torch.load(kept / "training_state" / "optimizer.pt", weights_only=True)
    assert optimizer["state"][0]["step"] == 1                 # step 1's state, untouched by the half-done step 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
