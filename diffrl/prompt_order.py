"""Which prompts (or records) each process sees at each step: seeded epochs, a pure function of the step."""

from __future__ import annotations

import functools

import torch


def prompts_for_step(prompts: list[str], step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
                     ) -> list[str]:
    """The prompts of one process at one step: epochs of seeded permutations, a pure function of the step.

    Because the order depends only on (seed, step), a resumed run sees exactly the prompts it would have seen.
    """
    start = step * batch_size * world_size + rank * batch_size
    positions = [divmod(position, len(prompts)) for position in range(start, start + batch_size)]
    return [prompts[_epoch_order(len(prompts), seed, epoch)[index]] for epoch, index in positions]


@functools.lru_cache(maxsize=4)
def _epoch_order(num_prompts: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
