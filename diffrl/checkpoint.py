"""Atomic checkpoints: LoRA weights in the diffusers format plus everything needed to resume exactly.

Layout (DESIGN.md §3.2):
    checkpoints/step-000100/pytorch_lora_weights.safetensors
    checkpoints/step-000100/training_state/{optimizer,lr_scheduler,trainer,rng}.pt, state.json
A checkpoint is built in a hidden temporary folder and renamed into place, so a crash mid-save never leaves a
half-written ``step-*`` folder. Everything is read back with ``torch.load(weights_only=True)`` (no pickle code).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffrl.lora import LORA_WEIGHTS_NAME, load_lora_into, save_lora

STEP_PATTERN = re.compile(r"^step-(\d{6,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass
class TrainingState:
    """What the loop hands to save/load besides the UNet: each object has state_dict/load_state_dict."""

    optimizer: object
    lr_scheduler: object
    trainer: object


def save_checkpoint(run_dir: Path, step: int, unet, state: TrainingState) -> Path:
    final = Path(run_dir) / "checkpoints" / checkpoint_name(step)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "training_state").mkdir(parents=True)
    save_lora(unet, tmp)
    torch.save(state.optimizer.state_dict(), tmp / "training_state" / "optimizer.pt")
    torch.save(state.lr_scheduler.state_dict(), tmp / "training_state" / "lr_scheduler.pt")
    torch.save(state.trainer.state_dict(), tmp / "training_state" / "trainer.pt")
    torch.save(_rng_state(), tmp / "training_state" / "rng.pt")
    (tmp / "training_state" / "state.json").write_text(json.dumps({"step": step}))
    _replace_dir(tmp, final)
    return final


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


def prune_checkpoints(run_dir: Path, keep_last: int | None) -> None:
    if keep_last is None:
        return
    for path in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, unet, state: TrainingState) -> int:
    """Restore the LoRA weights, optimiser, scheduler, trainer and RNG states; returns the step."""
    load_lora_into(unet, path)
    folder = Path(path) / "training_state"
    state.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    state.lr_scheduler.load_state_dict(torch.load(folder / "lr_scheduler.pt", weights_only=True))
    state.trainer.load_state_dict(torch.load(folder / "trainer.pt", weights_only=True))
    _set_rng_state(torch.load(folder / "rng.pt", weights_only=True))
    return json.loads((folder / "state.json").read_text())["step"]


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
