"""User-defined rewards reached by load_reward as "tests.rewards.user_reward_fixture:ClassName"."""

from __future__ import annotations

from torch import Tensor


class MeanRedReward:
    """A valid user reward that is not an nn.Module: the mean of the red channel."""

    differentiable = True

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return images[:, 0].float().mean(dim=(1, 2))


class NotAReward:
    """Callable but without a `differentiable` attribute."""

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return images.mean(dim=(1, 2, 3))


class WrongShapeReward:
    """Returns [B, 1] instead of [B]: a user bug that score() must report."""

    differentiable = True

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return images.mean(dim=(1, 2, 3))[:, None]
