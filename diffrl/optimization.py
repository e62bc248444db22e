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


class Optimization:
    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer, lr_scheduler,
                 params: list[torch.nn.Parameter], max_grad_norm: float):
        self.accelerator, self.model = accelerator, model
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.params, self.max_grad_norm = params, max_grad_norm
        self.micro_batches_per_step = accelerator.gradient_accumulation_steps  # train.gradient_accumulation_steps

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
        """Backward; at an accumulation boundary clip, step and zero. Returns the pre-clip grad norm there, else None."""
        self.accelerator.backward(loss)
        grad_norm = None
        if self.accelerator.sync_gradients:
            grad_norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()       # a no-op between accumulation boundaries (accelerate's wrapper)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @property
    def learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]


def metrics_to_floats(metrics: dict[str, Tensor | float]) -> dict[str, float]:
    """Read a step's metrics off the device in one transfer (one host-device sync per step, not one per metric)."""
    device = next((value.device for value in metrics.values() if torch.is_tensor(value)), torch.device("cpu"))
    values = torch.stack([torch.as_tensor(value, dtype=torch.float32, device=device).detach().reshape(())
                          for value in metrics.values()])
    return dict(zip(metrics, values.tolist()))
