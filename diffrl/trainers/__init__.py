"""The Trainer protocol and the registry of trainers: name -> (config dataclass, trainer class)."""

from __future__ import annotations

from typing import Protocol

from diffrl.trainers.draft import DraftConfig, DraftTrainer


class Trainer(Protocol):
    def step(self, prompts: list[str]) -> dict[str, float]: ...   # one outer iteration; returns metrics
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


TRAINERS = {
    "draft": (DraftConfig, DraftTrainer),
}
