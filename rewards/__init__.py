"""Rewards for fine-tuning: the Reward protocol, the REWARDS registry, load_reward(spec) and score().

A spec is a registry name ("brightness"), a user reward "package.module:ClassName" (built with no arguments), or
a mapping {name_or_module_class: weight}; several entries (or a weight other than 1) give a MixReward.
Heavy backbones are loaded when a reward is built, never at import (their modules import transformers / open_clip
inside functions). A reward with published weights is loaded once per process while anything holds it.
"""

from __future__ import annotations

import importlib
import weakref
from numbers import Real
from typing import Protocol, runtime_checkable

from torch import Tensor

from diffrl.errors import UserInputError, unknown_name  # importing diffrl installs its torchvision fix first
from rewards.aesthetic import AestheticReward
from rewards.clip_score import ClipScoreReward
from rewards.compressibility import CompressibilityReward, IncompressibilityReward
from rewards.hps import HPSReward
from rewards.image_reward import ImageRewardModel
from rewards.mix import MixReward
from rewards.pickscore import PickScoreReward
from rewards.shapes import ShapesAccuracyReward, ShapesAlignmentReward
from rewards.statistics import BrightnessReward, ContrastReward, SaturationReward


@runtime_checkable
class Reward(Protocol):
    """What trainers call: images [B, 3, H, W] in [0, 1] and their prompts -> float32 scores [B]."""

    differentiable: bool  # True if gradients flow from the scores back to the images

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...


@runtime_checkable
class PretrainedReward(Protocol):
    """A registered reward class built from published weights (instead of with no arguments)."""

    @classmethod
    def pretrained(cls, local_path: str | None = None) -> Reward:
        """Load the weights from `local_path` (config: reward_weights.<name>), else the Hugging Face cache or hub."""

    @classmethod
    def weights_present(cls, local_path: str | None = None) -> bool:
        """Whether `pretrained` would find its weights without network."""


REWARDS = {
    "brightness": BrightnessReward,
    "saturation": SaturationReward,
    "contrast": ContrastReward,
    "shapes_alignment": ShapesAlignmentReward,
    "shapes_accuracy": ShapesAccuracyReward,
    "compressibility": CompressibilityReward,
    "incompressibility": IncompressibilityReward,
    "aesthetic": AestheticReward,
    "clip_score": ClipScoreReward,
    "pickscore": PickScoreReward,
    "hps": HPSReward,
    "image_reward": ImageRewardModel,
}

# (name, local path) -> the loaded reward, for as long as something (a run, a mix) holds it.
_loaded: weakref.WeakValueDictionary[tuple[str, str | None], Reward] = weakref.WeakValueDictionary()


def describe(name: str) -> str:
    """One line about a registered reward (its class docstring's first line), for `diffrl list`."""
    return REWARDS[name].__doc__.strip().splitlines()[0]


def weights_present(name: str) -> bool | None:
    """Whether a registered reward's published weights are on this machine (None: it has none); no network."""
    cls = REWARDS[name]
    return cls.weights_present() if issubclass(cls, PretrainedReward) else None


def load_reward(spec: str | dict[str, float], weights: dict[str, str] | None = None) -> Reward:
    """Build the reward a spec names; `weights` maps reward names to local weight paths (config reward_weights).
    A user mistake raises UserInputError with one sentence."""
    weights = weights or {}
    for name in weights:
        if not issubclass(REWARDS.get(name, object), PretrainedReward):
            with_weights = [n for n, cls in REWARDS.items() if issubclass(cls, PretrainedReward)]
            raise UserInputError(f"reward_weights.{name}: {name!r} is not a reward with published weights; "
                                 f"those are: {', '.join(with_weights)}")
    if isinstance(spec, str):
        return _load_one(spec, weights)
    if not isinstance(spec, dict) or not spec:
        raise UserInputError(f"reward must be a name, 'package.module:ClassName' or a {{name: weight}} mapping, "
                             f"got {spec!r}")
    for name, weight in spec.items():
        if isinstance(weight, bool) or not isinstance(weight, Real):
            raise UserInputError(f"reward weight for {name!r} must be a number, got {weight!r}")
    if len(spec) == 1 and next(iter(spec.values())) == 1.0:
        return _load_one(next(iter(spec)), weights)
    return MixReward({name: (_load_one(name, weights), float(weight)) for name, weight in spec.items()})


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


def _load_one(name: str, weights: dict[str, str]) -> Reward:
    if ":" in name:
        return _load_user_reward(name)
    if name not in REWARDS:
        raise unknown_name("reward", name, REWARDS)
    cls = REWARDS[name]
    if not issubclass(cls, PretrainedReward):
        return cls()
    key = (name, weights.get(name))
    reward = _loaded.get(key)
    if reward is None:
        reward = _loaded[key] = cls.pretrained(weights.get(name))
    return reward


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
