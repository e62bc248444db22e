"""Atomic checkpoints: LoRA weights in the diffusers format plus everything needed to resume exactly.

Layout (docs/contracts.md):
    checkpoints/step-000100/pytorch_lora_weights.safetensors
    checkpoints/step-000100/training_state/{optimizer,lr_scheduler,trainer,rng}.pt, state.json
    checkpoints/step-000100/training_state/loss_scaler.pt                 (fp16 runs: GradScaler's scale)
    checkpoints/step-000100/training_state/process-1/{trainer,rng}.pt     (multi-process runs: one per extra process)
Weights, optimiser and schedule are the same in every process and written by the main one; each process writes its
own RNG state (processes draw different noise) and trainer state (DPOK's replay buffer holds that process's own
transitions), so a multi-process run resumes exactly too.
A checkpoint is built in a hidden temporary folder and renamed into place, so a crash mid-save never leaves a
half-written ``step-*`` folder. Everything is read back with ``torch.load(weights_only=True)`` (no pickle code).
At resume, leftovers of an interrupted save are cleaned up and a checkpoint that fails to load is reported by name
and set aside, so the run continues from the newest one that loads.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from diffrl.lora import LORA_WEIGHTS_NAME

STEP_PATTERN = re.compile(r"^step-(\d{6,})$")
# Test-only fault injection: a save of this step stops after the LoRA file, touches PAUSED and sleeps, so a test can
# SIGKILL the process in the middle of writing a checkpoint (tests/test_checkpoint.py).
PAUSE_SAVE_AT_STEP = "DIFFRL_TEST_PAUSE_SAVE_AT_STEP"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"



class LoraWeights(Protocol):
    """The trained adapter, written in its model family's LoRA format (diffrl.families: ModelFamily)."""

    def save_lora(self, directory: Path) -> Path: ...
    def load_lora(self, directory: Path) -> None: ...


@dataclass
class TrainingState:
    """What the loop hands to save/load besides the UNet: each object has state_dict/load_state_dict."""

    optimizer: object
    lr_scheduler: object
    trainer: object
    loss_scaler: object | None = None   # fp16 loss scaling (Optimization); its state_dict is empty otherwise


@dataclass
class Processes:
    """This process's place in a multi-process run and how to wait for the others; the defaults are one process."""

    index: int = 0
    count: int = 1
    barrier: Callable[[], None] = lambda: None


def save_checkpoint(run_dir: Path, step: int, weights: LoraWeights, state: TrainingState, info: dict | None = None,
                    processes: Processes = Processes()) -> Path:
    """Write checkpoints/step-N atomically; ``info`` (JSON) joins the step in training_state/state.json.

    In a multi-process run every process calls this: the main process writes the shared files, each process its own
    state, and the main process renames the folder into place once all have written.
    """
    final = Path(run_dir) / "checkpoints" / checkpoint_name(step)
    tmp = final.with_name(f".tmp-{final.name}")
    main = processes.index == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "training_state").mkdir(parents=True)
        weights.save_lora(tmp)
        _pause_if_requested(step, tmp)
        torch.save(state.optimizer.state_dict(), tmp / "training_state" / "optimizer.pt")
        torch.save(state.lr_scheduler.state_dict(), tmp / "training_state" / "lr_scheduler.pt")
        if state.loss_scaler is not None and (scaler := state.loss_scaler.state_dict()):
            torch.save(scaler, tmp / "training_state" / "loss_scaler.pt")
    processes.barrier()
    own = _process_folder(tmp / "training_state", processes.index)
    own.mkdir(exist_ok=True)
    torch.save(state.trainer.state_dict(), own / "trainer.pt")
    torch.save(_rng_state(), own / "rng.pt")
    processes.barrier()
    if main:
        (tmp / "training_state" / "state.json").write_text(
            json.dumps({**(info or {}), "step": step, "num_processes": processes.count}))
        _replace_dir(tmp, final)
    return final


def _process_folder(training_state: Path, index: int) -> Path:
    return training_state if index == 0 else training_state / f"process-{index}"


def _pause_if_requested(step: int, tmp: Path) -> None:
    if os.environ.get(PAUSE_SAVE_AT_STEP) == str(step):
        (tmp / "PAUSED").touch()
        time.sleep(3600)


def _replace_dir(tmp: Path, final: Path) -> None:
    """rename() is atomic; an existing folder of the same name is moved aside first and removed after."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / LORA_WEIGHTS_NAME).is_file()
            and (p / "training_state" / "state.json").is_file()]


def recover_interrupted_saves(run_dir: Path) -> list[str]:
    """Clean up after a process killed while saving; returns one note per folder touched.

    A ``.tmp-step-N`` folder is a save that never finished: removed. A ``.old-step-N`` folder without its
    ``step-N`` is a complete checkpoint caught between the two renames of _replace_dir: put back.
    """
    folder, notes = Path(run_dir) / "checkpoints", []
    for path in sorted(folder.glob(".tmp-step-*")) if folder.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
        notes.append(f"removed {path.name}, a checkpoint whose save was interrupted")
    for path in sorted(folder.glob(".old-step-*")) if folder.is_dir() else []:
        final = path.with_name(path.name.removeprefix(".old-"))
        if final.exists():
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.replace(path, final)
            notes.append(f"restored {final.name} from {path.name}, left by an interrupted save")
    return notes


def prune_checkpoints(run_dir: Path, keep_last: int | None) -> None:
    if keep_last is None:
        return
    for path in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def load_latest_checkpoint(run_dir: Path, weights: LoraWeights, state: TrainingState, *, set_aside: bool = True,
                           process_index: int = 0) -> tuple[Path | None, dict, list[str]]:
    """Load the newest checkpoint that loads: (its path, its state.json, notes on the ones set aside).

    Newer checkpoints that failed (a truncated file) are renamed to ``.bad-step-N``, so that later saves and
    listings skip them, and each is named in a note. If none loads (often a config naming another model), nothing
    is renamed and the error lists every failure. In a multi-process run only the main process sets aside. Loading
    overwrites every restored object in full, so a checkpoint that failed half-way leaves nothing behind once an
    older one has loaded.
    """
    failures = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            load_checkpoint(path, weights, state, process_index)
        except Exception as error:  # noqa: BLE001  any failure to read a checkpoint means: try the previous one
            message = str(error).strip().splitlines()
            failures.append((path, f"{type(error).__name__}: {message[0] if message else ''}"))
            continue
        notes = [_set_aside(bad, reason, path) for bad, reason in failures] if set_aside else []
        return path, read_checkpoint_info(path), notes
    if failures:
        from diffrl.errors import UserInputError

        listed = "; ".join(f"{path.name} ({reason})" for path, reason in failures)
        raise UserInputError(f"no checkpoint in {Path(run_dir) / 'checkpoints'} could be loaded with this config's "
                             f"model and adapter: {listed}")
    return None, {"step": 0}, []


def _set_aside(path: Path, reason: str, resumed: Path) -> str:
    bad = path.with_name(f".bad-{path.name}")
    shutil.rmtree(bad, ignore_errors=True)
    os.replace(path, bad)
    return f"checkpoint {path.name} could not be loaded ({reason}); moved it to {bad.name}, resuming from {resumed.name}"


def read_checkpoint_info(path: Path) -> dict:
    return json.loads((Path(path) / "training_state" / "state.json").read_text())


def load_checkpoint(path: Path, weights: LoraWeights, state: TrainingState, process_index: int = 0) -> int:
    """Restore the LoRA weights, optimiser, scheduler, trainer and RNG states; returns the step.

    Each process loads its own trainer and RNG state. A process that the saving run did not have (resuming with
    more processes) takes the trainer state of process index mod saved count and keeps its own RNG, which the
    caller has seeded: the run goes on correctly, but not draw for draw as an uninterrupted one.
    """
    weights.load_lora(path)
    folder = Path(path) / "training_state"
    state.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    state.lr_scheduler.load_state_dict(torch.load(folder / "lr_scheduler.pt", weights_only=True))
    if state.loss_scaler is not None and (folder / "loss_scaler.pt").is_file():
        state.loss_scaler.load_state_dict(torch.load(folder / "loss_scaler.pt", weights_only=True))
    info = json.loads((folder / "state.json").read_text())
    saved_processes = info.get("num_processes", 1)
    own = _process_folder(folder, process_index % saved_processes)
    state.trainer.load_state_dict(torch.load(own / "trainer.pt", weights_only=True))
    if process_index < saved_processes:
        _set_rng_state(torch.load(own / "rng.pt", weights_only=True))
    return info["step"]


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    version, internal, *rest = state["python"]
    random.setstate((version, tuple(internal), *rest))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
