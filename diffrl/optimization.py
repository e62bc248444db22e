"""Optimization: backward, clipping and the optimiser step under accelerate, shared by every trainer.

Trainers own their losses and decide how many optimiser steps an outer iteration takes; accelerate owns gradient
accumulation, mixed-precision scaling and gradient synchronisation across processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from accelerate import Accelerator


# fp16 loss scaling halves its scale at each overflow, from 2^16: after this many skipped updates in a row the scale
# is 2^-4, so it is the gradients themselves that overflow float16, and the run would go on without ever updating.
MAX_CONSECUTIVE_SCALER_SKIPS = 20


class Optimization:
    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer, lr_scheduler,
                 params: list[torch.nn.Parameter], max_grad_norm: float):
        self.accelerator, self.model = accelerator, model
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.params, self.max_grad_norm = params, max_grad_norm
        self.micro_batches_per_step = accelerator.gradient_accumulation_steps  # train.gradient_accumulation_steps
        self.scaler_skips = self.consecutive_scaler_skips = 0   # fp16 updates skipped by the loss scaler

    def set_backward_passes_per_micro_batch(self, passes: int) -> None:
        """For trainers whose micro-batch takes several backward passes (DDPO/LOOP: one per trained timestep).

        accelerate then syncs and steps after micro_batches_per_step × passes backward calls and divides each loss by
        that count, so the update is the mean over all of them, as in DDPO's official code.
        """
        self.accelerator.gradient_accumulation_steps = self.micro_batches_per_step * passes

    def accumulate(self):
        """Context for one micro-batch: gradients sync and the optimiser steps only at accumulation boundaries."""
        return self.accelerator.accumulate(self.model)

    def step(self, loss: Tensor) -> Tensor | None:
        """Backward; at an accumulation boundary clip, step and zero. Returns the pre-clip grad norm there, else None
        (also for an update that fp16 loss scaling skipped)."""
        self.accelerator.backward(loss)
        grad_norm = None
        if self.accelerator.sync_gradients:
            grad_norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()       # a no-op between accumulation boundaries (accelerate's wrapper)
        self.lr_scheduler.step()    # accelerate's wrapper does not advance past an update the scaler skipped
        self.optimizer.zero_grad(set_to_none=True)
        if grad_norm is not None and self.accelerator.scaler is not None:
            grad_norm = self._loss_scaling_outcome(grad_norm)
        return grad_norm

    def _loss_scaling_outcome(self, grad_norm: Tensor) -> Tensor | None:
        """While fp16 loss scaling searches its scale, overflowing gradients are expected: the scaler skipped the
        update and lowered the scale, so that update's infinite norm is not a non-finite gradient of the run."""
        if not self.accelerator.optimizer_step_was_skipped:   # one host sync per optimiser step, fp16 only
            self.consecutive_scaler_skips = 0
            return grad_norm
        self.scaler_skips += 1
        self.consecutive_scaler_skips += 1
        return None

    def scaler_overflowing(self) -> bool:
        """True once fp16 loss scaling has skipped MAX_CONSECUTIVE_SCALER_SKIPS updates in a row."""
        return self.consecutive_scaler_skips >= MAX_CONSECUTIVE_SCALER_SKIPS

    def state_dict(self) -> dict:
        """The fp16 loss scaler's state (its scale and growth tracker), empty without fp16."""
        scaler = self.accelerator.scaler
        return {} if scaler is None else {"scaler": scaler.state_dict(), "scaler_skips": self.scaler_skips,
                                          "consecutive_scaler_skips": self.consecutive_scaler_skips}

    def load_state_dict(self, state: dict) -> None:
        if self.accelerator.scaler is not None and state:
            self.accelerator.scaler.load_state_dict(state["scaler"])
            self.scaler_skips, self.consecutive_scaler_skips = state["scaler_skips"], state["consecutive_scaler_skips"]

    def restart(self, learning_rate: float) -> None:
        """A new base learning rate and an empty AdamW state, as if a new run began from the current weights (SPIN's
        iterations). The schedule's multiplier (warmup, decay) keeps counting over the whole run."""
        self.optimizer.state.clear()
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)   # accelerate's wrapper, or plain
        groups = self.optimizer.param_groups
        factors = [group["lr"] / base if base else 1.0 for group, base in zip(groups, scheduler.base_lrs)]
        scheduler.base_lrs = [learning_rate] * len(groups)
        for group, factor in zip(groups, factors):
            group["initial_lr"], group["lr"] = learning_rate, learning_rate * factor
        # get_last_lr() (the logged "lr") reads _last_lr, which torch sets only in step(); it has no public setter,
        # and a step() here would advance the schedule by one.
        scheduler._last_lr = [group["lr"] for group in groups]

