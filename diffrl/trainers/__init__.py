"""The Trainer protocol and the registry of trainers: name -> (config dataclass, trainer class)."""

from __future__ import annotations

from typing import Protocol

from diffrl.trainers.adjoint_matching import AdjointMatchingConfig, AdjointMatchingTrainer
from diffrl.trainers.ddpo import DdpoConfig, DdpoTrainer
from diffrl.trainers.dpok import DpokConfig, DpokTrainer
from diffrl.trainers.draft import DraftConfig, DraftTrainer
from diffrl.trainers.loop import LoopConfig, LoopTrainer
from diffrl.trainers.pso import PsoConfig, PsoTrainer
from diffrl.trainers.spin import SpinConfig, SpinTrainer


class Trainer(Protocol):
    def step(self, prompts: list[str]) -> dict[str, float]: ...   # one outer iteration; returns metrics
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...

    @staticmethod
    def optimizer_steps_per_step(config) -> float: ...  # for the LR schedule's length; checks batch settings


TRAINERS = {
    "draft": (DraftConfig, DraftTrainer),
    "ddpo": (DdpoConfig, DdpoTrainer),
    "loop": (LoopConfig, LoopTrainer),
    "dpok": (DpokConfig, DpokTrainer),
    "adjoint_matching": (AdjointMatchingConfig, AdjointMatchingTrainer),
    "spin": (SpinConfig, SpinTrainer),
    "pso": (PsoConfig, PsoTrainer),
}
