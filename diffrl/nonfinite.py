"""NaN/inf in a step: undo it (train.max_nonfinite_skips) or stop the run naming the step and the last good
checkpoint; and fp16 loss scaling that keeps skipping updates, which stops the run the same way."""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from diffrl.checkpoint import TrainingState
from diffrl.errors import NonFiniteError
from diffrl.optimization import Optimization


def non_finite(metrics: dict[str, float]) -> list[str]:
    return [name for name, value in metrics.items() if not math.isfinite(value)]


def _kept(last_checkpoint: Path | None) -> str:
    return f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"


def fp16_skipped_updates(optimization: Optimization, step: int, last_checkpoint: Path | None) -> int:
    """Updates fp16 loss scaling skipped so far; stops the run when they no longer end (see optimization.py)."""
    if optimization.scaler_overflowing():
        raise NonFiniteError(f"step {step}: fp16 loss scaling skipped the last {optimization.consecutive_scaler_skips} "
                             "optimizer updates because the gradients overflow float16 at any scale; train with "
                             f"train.mixed_precision=bf16 (or no) instead ({_kept(last_checkpoint)})")
    return optimization.scaler_skips


@dataclass
class StepUndo:
    """What one step changes (weights, gradients being accumulated, optimiser, schedule, trainer state such as
    DDPO's per-prompt reward buffers), copied so that a NaN/inf step can be undone as if it never ran. LoRA
    weights and their optimiser state are small, so the copy costs little next to the step itself."""

    state: TrainingState
    accelerator: Accelerator

    def __post_init__(self) -> None:
        state = self.state
        params = self._params()
        self.values = [p.detach().clone() for p in params]
        self.grads = [None if p.grad is None else p.grad.clone() for p in params]
        self.optimizer = copy.deepcopy(state.optimizer.state_dict())
        self.lr_scheduler = copy.deepcopy(state.lr_scheduler.state_dict())
        self.trainer = copy.deepcopy(state.trainer.state_dict())
        self.loss_scaler = copy.deepcopy(state.loss_scaler.state_dict())
        self.accumulation_step = self.accelerator.step

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.state.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def restore(self) -> None:
        for param, value, grad in zip(self._params(), self.values, self.grads):
            param.copy_(value)
            param.grad = grad
        self.state.optimizer.load_state_dict(self.optimizer)
        self.state.lr_scheduler.load_state_dict(self.lr_scheduler)
        self.state.trainer.load_state_dict(self.trainer)
        self.state.loss_scaler.load_state_dict(self.loss_scaler)
        self.accelerator.step = self.accumulation_step


def skip_step(undo: StepUndo | None, metrics: dict[str, float], bad: list[str], step: int, skips: int,
              allowed: int, last_checkpoint: Path | None, *, main_process: bool) -> dict:
    """Undo a step whose loss, reward or grad norm was NaN/inf and return its metrics row (with the skip count
    after it), or stop the run when that would exceed train.max_nonfinite_skips (0: stop at the first)."""
    what = f"{', '.join(bad)} became non-finite"
    if skips >= allowed:
        over = f" after {allowed} skipped steps (train.max_nonfinite_skips={allowed})" if allowed else ""
        raise NonFiniteError(f"step {step}: {what}{over}; stopping the run ({_kept(last_checkpoint)})")
    undo.restore()
    skips += 1
    if main_process:
        tqdm.write(f"diffrl: step {step} skipped: {what} ({skips} of {allowed} skips allowed)", file=sys.stderr)
    finite = {name: value for name, value in metrics.items() if name not in bad}
    return {"step": step, "skipped": what, "nonfinite_skips": skips, **finite}
