"""A step's metrics: the reward statistics every trainer logs, and the read-off from the device."""

from __future__ import annotations

import torch
from torch import Tensor


def reward_metrics(rewards: Tensor, components: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """reward_mean, reward_std and each mixed reward's reward/<name> mean, still on the device, without a graph."""
    rewards = rewards.detach().float()
    return {"reward_mean": rewards.mean(), "reward_std": rewards.std(correction=0),
            **{f"reward/{name}": value.detach().float().mean() for name, value in (components or {}).items()}}


def metrics_to_floats(metrics: dict[str, Tensor | float]) -> dict[str, float]:
    """Read a step's metrics off the device in one transfer (one host-device sync per step, not one per metric)."""
    device = next((value.device for value in metrics.values() if torch.is_tensor(value)), torch.device("cpu"))
    values = torch.stack([torch.as_tensor(value, dtype=torch.float32, device=device).detach().reshape(())
                          for value in metrics.values()])
    return dict(zip(metrics, values.tolist()))

