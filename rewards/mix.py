"""MixReward: a weighted sum of rewards that also reports each component's own (unweighted) score."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

# a reward as rewards.Reward describes it (not imported: rewards imports this module)
Reward = Callable[[Tensor, list[str]], Tensor]


class MixReward(nn.Module):
    """Weighted sum of several rewards, e.g. {aesthetic: 1.0, clip_score: 0.05}; reports each component."""

    def __init__(self, components: dict[str, tuple[Reward, float]]):
        super().__init__()
        self.terms = {name: (reward, float(weight)) for name, (reward, weight) in components.items()}
        # Registered so that .to(device), .eval() and .requires_grad_() reach the components that are modules.
        modules = [reward for reward, _ in self.terms.values() if isinstance(reward, nn.Module)]
        self.reward_modules = nn.ModuleList(modules)
        self.differentiable = all(reward.differentiable for reward, _ in self.terms.values())

    def components(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """Each component's unweighted score, float32 [B], keyed by its name."""
        return {name: reward(images, prompts) for name, (reward, _) in self.terms.items()}

    def weighted_sum(self, components: dict[str, Tensor]) -> Tensor:
        """Σ weight · score over the components returned by `components`."""
        return sum(self.terms[name][1] * value for name, value in components.items())

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.weighted_sum(self.components(images, prompts))
