"""The Trainer protocol (everything the training loop relies on) and the registry of trainers: name -> (config
dataclass, trainer class). The run config's trainer sections are made from TRAINERS (diffrl.config), so a new trainer
is one file here plus one line below. A user trainer is reachable from YAML as ``trainer: "package.module:Class"``;
its section, if its class has a ``config_class``, is named like the class (``Class: {...}``)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from diffrl.errors import UserInputError, unknown_name
from diffrl.trainers.adjoint_matching import AdjointMatchingConfig, AdjointMatchingTrainer
from diffrl.trainers.ddpo import DdpoConfig, DdpoTrainer
from diffrl.trainers.dpok import DpokConfig, DpokTrainer
from diffrl.trainers.draft import DraftConfig, DraftTrainer
from diffrl.trainers.loop import LoopConfig, LoopTrainer
from diffrl.trainers.nft import NftConfig, NftTrainer
from diffrl.trainers.pso import PsoConfig, PsoTrainer
from diffrl.trainers.spin import SpinConfig, SpinTrainer

if TYPE_CHECKING:
    from diffrl.optimization import Optimization
    from diffrl.sampler import SDSampler

# Every step's metrics hold these (the progress bar, metrics.jsonl's contract, the run report).
REQUIRED_METRICS = ("loss", "reward_mean")


class Trainer(Protocol):
    # Whether backward runs through a chain of denoiser calls and the decode (DRaFT): train.gradient_checkpointing's
    # default follows it.
    backpropagates_through_sampling: ClassVar[bool]

    def __init__(self, config, sampler: SDSampler, reward, optimization: Optimization, *, run_dir: Path) -> None:
        """config: the trainer's own section (None for a user trainer without config_class); run_dir: the run folder,
        where a trainer keeps what it caches (dataset latents, generated images) so that resume finds it."""

    @staticmethod
    def optimizer_steps_per_step(config) -> float: ...  # config: the run's Config; the LR schedule's length; checks
    #                                                      batch settings before any model loads

    def step(self, prompts: list[str]) -> dict[str, float]: ...   # one outer iteration: REQUIRED_METRICS and more
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


TRAINERS: dict[str, tuple[type, type[Trainer]]] = {
    "draft": (DraftConfig, DraftTrainer),
    "ddpo": (DdpoConfig, DdpoTrainer),
    "loop": (LoopConfig, LoopTrainer),
    "dpok": (DpokConfig, DpokTrainer),
    "adjoint_matching": (AdjointMatchingConfig, AdjointMatchingTrainer),
    "spin": (SpinConfig, SpinTrainer),
    "pso": (PsoConfig, PsoTrainer),
    "nft": (NftConfig, NftTrainer),
}


def trainer_entry(name: str) -> tuple[type | None, type[Trainer]]:
    """(config dataclass or None, trainer class) of a built-in name or a ``package.module:Class`` spec."""
    if ":" in name:
        return _user_trainer(name)
    if name not in TRAINERS:
        raise UserInputError(f'{unknown_name("trainer", name, TRAINERS)}, or a user trainer as '
                             '"package.module:Class"')
    return TRAINERS[name]


def section_name(trainer: str) -> str:
    """The config section of a trainer: its registry name, or a user trainer's class name."""
    return trainer.rpartition(":")[2]


def _user_trainer(spec: str) -> tuple[type | None, type[Trainer]]:
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserInputError(f"trainer {spec!r}: cannot import module {module_name!r} ({error}); built-in "
                             f"trainers: {', '.join(TRAINERS)}") from error
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise UserInputError(f"trainer {spec!r}: module {module_name!r} has no class {class_name!r}")
    missing = [name for name in ("step", "state_dict", "load_state_dict", "optimizer_steps_per_step")
               if not callable(getattr(cls, name, None))]
    missing += [] if isinstance(getattr(cls, "backpropagates_through_sampling", None), bool) else [
        "backpropagates_through_sampling"]
    if missing:
        raise UserInputError(f"trainer {spec!r} lacks {', '.join(missing)} of the Trainer protocol "
                             "(diffrl.trainers.Trainer; see docs/extending.md)")
    return getattr(cls, "config_class", None), cls
