"""Reward and pixel diversity of a run's base model and each of its checkpoints, on fixed prompts and seeds.

Every row samples the same prompts from the same initial latents and step noise, with the run's own sampler settings
(steps, CFG, eta, schedule), so differences come from the weights. Diversity is the mean pairwise RMS pixel distance
between one prompt's samples (diffrl.diversity.pixel_diversity); both columns are means over prompts ± a standard
error. A stop-gap until `diffrl evaluate` (which will add embedding-based diversity, plots and files).

    python scripts/reward_diversity.py runs/am --samples-per-prompt 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffrl.checkpoint import list_checkpoints  # noqa: E402
from diffrl.config import load_config  # noqa: E402
from diffrl.diversity import mean_and_standard_error, pixel_diversity  # noqa: E402
from diffrl.models import load_pipeline  # noqa: E402
from diffrl.sampler import SDSampler  # noqa: E402
from diffrl.training import load_prompts  # noqa: E402
from rewards import load_reward  # noqa: E402


@torch.no_grad()
def evaluate(sampler: SDSampler, reward, prompts: list[str], seeds: list[int]) -> tuple[tuple, tuple]:
    rewards, diversities = [], []
    for prompt in prompts:
        latents = torch.cat([sampler.initial_latents(1, torch.Generator(sampler.device).manual_seed(seed))
                             for seed in seeds])
        traj = sampler.sample([prompt] * len(seeds), initial_latents=latents,
                              generator=torch.Generator(sampler.device).manual_seed(seeds[0]))
        rewards.append(float(reward(traj.images, traj.prompts).float().mean()))
        diversities.append(pixel_diversity(traj.images))
    return mean_and_standard_error(rewards), mean_and_standard_error(diversities)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8, help="the first N prompts of the run's prompt file")
    args = parser.parse_args()
    diffusers.utils.logging.set_verbosity_error()   # LoRA loading warns that the text encoder has no LoRA keys
    config = load_config(args.run_dir / "config.yaml", [])
    pipe = load_pipeline(config.model)
    reward = load_reward(config.reward, config.reward_weights)
    sample = config.sample
    prompts = load_prompts(config.prompts)[: args.prompts]
    seeds = list(range(args.samples_per_prompt))
    print(f"{'checkpoint':>12}  {'reward':>18}  {'pixel diversity':>18}")
    for checkpoint in [None, *list_checkpoints(args.run_dir)]:
        if checkpoint is not None:
            if getattr(pipe.unet, "_hf_peft_config_loaded", False):
                pipe.unload_lora_weights()
            pipe.load_lora_weights(str(checkpoint))
        sampler = SDSampler(pipe, sample.num_steps, sample.guidance_scale, sample.eta, sample.resolution,
                            negative_prompt=sample.negative_prompt, schedule=sample.schedule)
        (r, r_se), (d, d_se) = evaluate(sampler, reward, prompts, seeds)
        name = "base" if checkpoint is None else checkpoint.name
        print(f"{name:>12}  {r:9.4f} ± {r_se:.4f}  {d:9.4f} ± {d_se:.4f}", flush=True)


if __name__ == "__main__":
    main()
