"""Rewards for fine-tuning: the Reward protocol, the REWARDS registry, load_reward(spec) and score().

A spec is a registry name ("brightness"), a user reward "package.module:ClassName" (built with no arguments), or
a mapping {name_or_module_class: weight}; several entries (or a weight other than 1) give a MixReward.
Heavy backbones are loaded when a reward is built, never at import.
"""

from __future__ import annotations

import importlib
from numbers import Real
from typing import Protocol, runtime_checkable

from torch import Tensor

from diffrl.errors import UserInputError, unknown_name
from rewards.compressibility import CompressibilityReward, IncompressibilityReward
from rewards.mix import MixReward
from rewards.statistics import BrightnessReward, ContrastReward, SaturationReward


@runtime_checkable
class Reward(Protocol):
    """What trainers call: images [B, 3, H, W] in [0, 1] and their prompts -> float32 scores [B]."""

    differentiable: bool  # True if gradients flow from the scores back to the images

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...


REWARDS = {
    "brightness": BrightnessReward,
    "saturation": SaturationReward,
    "contrast": ContrastReward,
    "compressibility": CompressibilityReward,
    "incompressibility": IncompressibilityReward,
}


def describe(name: str) -> str:
    """One line about a registered reward (its class docstring's first line), for `diffrl list`."""
    return REWARDS[name].__doc__.strip().splitlines()[0]


def load_reward(spec: str | dict[str, float]) -> Reward:
    """Build the reward a spec names; a user mistake raises UserInputError with one sentence."""
    if isinstance(spec, str):
        return _load_one(spec)
    if not isinstance(spec, dict) or not spec:
        raise UserInputError(f"reward must be a name, 'package.module:ClassName' or a {{name: weight}} mapping, "
                             f"got {spec!r}")
    for name, weight in spec.items():
        if isinstance(weight, bool) or not isinstance(weight, Real):
            raise UserInputError(f"reward weight for {name!r} must be a number, got {weight!r}")
    if len(spec) == 1 and next(iter(spec.values())) == 1.0:
        return _load_one(next(iter(spec)))
    return MixReward({name: (_load_one(name), float(weight)) for name, weight in spec.items()})


def score(reward: Reward, images: Tensor, prompts: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """The total reward [B] and each component's unweighted score [B]; a single reward is its own component."""
    if isinstance(reward, MixReward):
        components = reward.components(images, prompts)
        total = reward.weighted_sum(components)
    else:
        total = reward(images, prompts)
        components = {reward_name(reward): total}
    if total.shape != (images.shape[0],):
        raise UserInputError(f"reward {reward_name(reward)!r} returned shape {tuple(total.shape)}; "
                             f"a reward must return one score per image, shape ({images.shape[0]},)")
    return total, components


def reward_name(reward: Reward) -> str:
    """The registry name of a built-in reward, else "module:ClassName" (how a user reward is spelled in a spec)."""
    cls = type(reward)
    for name, registered in REWARDS.items():
        if registered is cls:
            return name
    return "mix" if cls is MixReward else f"{cls.__module__}:{cls.__qualname__}"


def _load_one(name: str) -> Reward:
    if ":" in name:
        return _load_user_reward(name)
    if name not in REWARDS:
        raise unknown_name("reward", name, REWARDS)
    return REWARDS[name]()


def _load_user_reward(spec: str) -> Reward:
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise UserInputError(f"reward {spec!r} is not of the form 'package.module:ClassName'; "
                             f"built-in rewards: {', '.join(sorted(REWARDS))}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserInputError(f"reward {spec!r}: cannot import module {module_name!r} ({error}); "
                             f"built-in rewards: {', '.join(sorted(REWARDS))}") from error
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise UserInputError(f"reward {spec!r}: module {module_name!r} has no class {class_name!r}; "
                             f"built-in rewards: {', '.join(sorted(REWARDS))}")
    reward = cls()
    if not isinstance(reward, Reward):
        raise UserInputError(f"reward {spec!r} is not a reward: it needs a `differentiable` attribute and "
                             f"__call__(images, prompts) returning a [B] tensor")
    return reward
