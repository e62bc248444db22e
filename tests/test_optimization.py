"""Optimization under fp16 loss scaling: an overflowing update is skipped by the scaler, not reported as a NaN.

accelerate creates a GradScaler only for fp16 on an accelerator; on this CPU machine the test gives the Accelerator
the CPU GradScaler that it would have created on a GPU (same class, same calls), so the path our code takes runs.
"""

from __future__ import annotations

import diffrl  # noqa: F401  first: installs the torchvision fix before any library can import torchvision
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler

from diffrl.optimization import MAX_CONSECUTIVE_SCALER_SKIPS, Optimization
from diffrl.training import _fresh_accelerator

INITIAL_SCALE = 2.0 ** 10   # the model runs under fp16 autocast: 2^16 overflows its fp16 activations' gradients


def scaled_optimization() -> tuple[Optimization, torch.nn.Linear]:
    accelerator: Accelerator = _fresh_accelerator(mixed_precision="fp16")
    accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=INITIAL_SCALE)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer,
                                                         get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10))
    return Optimization(accelerator, model, optimizer, lr_scheduler, list(model.parameters()), 1e6), model


def loss_of(model: torch.nn.Linear, factor: float) -> torch.Tensor:
    return factor * model(torch.ones(2, 3)).sum()


def test_an_overflowing_update_is_skipped_and_the_next_one_applies():
    optimization, model = scaled_optimization()
    before = model.weight.detach().clone()
    # The scaled loss gradient, 1e35 * 1024, overflows the fp16 activations (max 65504), as a real overflow does.
    assert optimization.step(loss_of(model, 1e35)) is None
    assert torch.equal(model.weight, before)                       # no update
    assert optimization.accelerator.scaler.get_scale() == INITIAL_SCALE / 2
    assert optimization.lr_scheduler.get_last_lr() == [0.1]        # the schedule did not advance either
    assert (optimization.scaler_skips, optimization.consecutive_scaler_skips) == (1, 1)

    grad_norm = optimization.step(loss_of(model, 1.0))
    # d/dW of sum over 2 rows of W·1 + b: 2 per weight entry and 2 for the bias; unscaled before the norm.
    expected = torch.tensor([2.0, 2.0, 2.0, 2.0]).norm()
    torch.testing.assert_close(grad_norm, expected)
    torch.testing.assert_close(model.weight.detach(), before - 0.1 * 2.0)
    assert (optimization.scaler_skips, optimization.consecutive_scaler_skips) == (1, 0)
    assert not optimization.scaler_overflowing()


def test_overflow_that_never_ends_is_flagged_and_the_scaler_state_round_trips():
    optimization, model = scaled_optimization()
    for _ in range(MAX_CONSECUTIVE_SCALER_SKIPS - 1):
        optimization.step(loss_of(model, 1e35 * 2.0 ** MAX_CONSECUTIVE_SCALER_SKIPS))
    assert not optimization.scaler_overflowing()
    optimization.step(loss_of(model, 1e35 * 2.0 ** MAX_CONSECUTIVE_SCALER_SKIPS))
    assert optimization.scaler_overflowing()
    state = optimization.state_dict()
    assert state["scaler"]["scale"] == INITIAL_SCALE / 2 ** MAX_CONSECUTIVE_SCALER_SKIPS

    fresh, _ = scaled_optimization()
    fresh.load_state_dict(state)
    assert fresh.accelerator.scaler.get_scale() == INITIAL_SCALE / 2 ** MAX_CONSECUTIVE_SCALER_SKIPS
    assert fresh.scaler_overflowing() and fresh.scaler_skips == MAX_CONSECUTIVE_SCALER_SKIPS


def test_without_loss_scaling_the_state_is_empty():
    accelerator = _fresh_accelerator()
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    optimization = Optimization(accelerator, model, optimizer, get_scheduler("constant", optimizer), [], 1.0)
    assert optimization.state_dict() == {}
