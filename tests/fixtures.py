"""Small helpers shared by the trainer and loop tests: short configs and a reward that turns NaN."""

from __future__ import annotations

import torch

from diffrl.config import load_config

FAST = ["sample.num_steps=4", "sample.guidance_scale=4.0", "sample.batch_size=4", "reward=brightness",
        "prompts=assets/prompts/simple.txt", "log.grid_prompts=2", "log.grid_seeds=[0, 1]"]


def fast_config(*overrides: str):
    return load_config(None, [*FAST, *overrides])


def lora_state(unet) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in unet.named_parameters() if "lora_" in name}


class NanAfterTwoCalls(torch.nn.Module):
    """Brightness for two calls, then NaN: a stand-in for a reward model that blows up mid-run."""

    differentiable = True

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images, prompts):
        self.calls += 1
        brightness = images.mean(dim=(1, 2, 3))
        return brightness if self.calls <= 2 else brightness * float("nan")
