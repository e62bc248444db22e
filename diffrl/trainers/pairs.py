"""What the image-pair preference trainers share (SPIN-Diffusion, offline PSO): the dataset as cached latents, images
generated once per record and cached on disk, and one update of a Diffusion-DPO-family loss on (winner, loser) latent
pairs.

Generated latents are a pure function of (weights, seed, record index): each record's initial noise comes from its
own seeded generator, so a cache rebuilt after a crash, or on another number of processes, holds the same images.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from diffrl.atomic_files import atomic_path
from diffrl.errors import UserInputError
from diffrl.preference import PreferenceStats, denoising_errors
from diffrl.prompt_order import prompts_for_step

if TYPE_CHECKING:
    from accelerate import Accelerator

    from diffrl.optimization import Optimization
    from diffrl.sampler import SDSampler


PreferenceLoss = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, PreferenceStats]]


@dataclass
class PairDatasetConfig:
    dataset: str | None = None             # JSONL / folder of (prompt, image), a save_to_disk folder, or a hub id
    dataset_split: str = "train"           # split of a `datasets` dataset
    dataset_prompt_column: str | None = None  # `datasets` column of the prompt; None: prompt, caption or text
    dataset_image_column: str | None = None   # `datasets` column of the image; None: image, jpg or png (Pick-a-Pic:
    #                                          the preferred one of jpg_0/jpg_1)
    dataset_limit: int | None = None       # use only the first N records (quick runs); None: all
    cache_dir: str | None = None           # where dataset latents are cached (content-hashed); None: <run>/cache
    generation_batch_size: int = 8         # images per batch when generating the pairs' generated side


@dataclass
class PairDataset:
    prompts: list[str]
    latents: Tensor            # [N, ...] float32 on CPU: the VAE posterior mean in the family's latent scale
    key: str                   # content hash of images, prompts, resolution and VAE (cache_key)


def load_pair_dataset(config: PairDatasetConfig, section: str, sampler: SDSampler, run_dir: Path) -> PairDataset:
    """The configured dataset's prompts and latents, encoded on the main process once and cached by content."""
    from diffrl.image_data import cache_key, encode_latents, load_image_records

    if config.dataset is None:
        raise UserInputError(f"{section}.dataset is not set: give a JSONL or folder of (prompt, image) pairs or a "
                             f"`datasets` dataset, e.g. {section}.dataset=assets/datasets/shapes")
    records = load_image_records(config.dataset, split=config.dataset_split, prompt_column=config.dataset_prompt_column,
                                 image_column=config.dataset_image_column)
    records = records[:config.dataset_limit] if config.dataset_limit else records
    cache_dir = Path(config.cache_dir) if config.cache_dir else run_dir / "cache"
    accelerator = _accelerator()
    with accelerator.main_process_first():   # the main process encodes and writes; the others read its cache
        latents = encode_latents(records, sampler.vae, sampler.resolution, cache_dir, encode=sampler.family.encode_images)
    return PairDataset([r.prompt for r in records], latents, cache_key(records, sampler.resolution, sampler.vae))


def _accelerator() -> Accelerator:
    from accelerate import PartialState

    return PartialState()


def record_batch(num_records: int, step: int, batch_size: int, seed: int, process: int | None = None) -> list[int]:
    """Record indices of one process (default: this one) at one step: seeded epochs, a pure function of the step,
    so a resumed run sees the same records and an iteration knows in advance which records it will use."""
    state = _accelerator()
    process = state.process_index if process is None else process
    return prompts_for_step(list(range(num_records)), step, batch_size, seed, process, state.num_processes)


def records_of_steps(num_records: int, steps: range, batch_size: int, seed: int) -> list[int]:
    """Every record any process uses in these steps, sorted."""
    processes = range(_accelerator().num_processes)
    return sorted({i for step in steps for p in processes for i in record_batch(num_records, step, batch_size, seed, p)})


def record_seed(seed: int, stage: int, index: int) -> int:
    return (seed * 1_000_003 + stage * 100_003 + index) % (2**63)


@torch.no_grad()
def generate_latents(sampler: SDSampler, prompts: list[str], seeds: list[int], batch_size: int) -> Tensor:
    """[N, ...] final latents sampled by the sampler's current weights, image i from noise seeded by seeds[i]
    (see record_seed); the images are split over processes and gathered, in order, on every process."""
    state = _accelerator()
    mine = list(range(state.process_index, len(prompts), state.num_processes))
    parts, noise = [], None
    for start in range(0, len(mine), batch_size):
        indices = mine[start:start + batch_size]
        noise = torch.cat([sampler.initial_latents(1, torch.Generator(sampler.device).manual_seed(seeds[i]))
                           for i in indices])
        traj = sampler.sample([prompts[i] for i in indices], initial_latents=noise,
                              generator=torch.Generator(sampler.device).manual_seed(seeds[indices[0]]))
        parts.append(traj.latents[:, -1].float())
    size = (len(prompts) + state.num_processes - 1) // state.num_processes
    local = torch.cat(parts) if parts else torch.zeros(sampler.latent_shape(0), device=sampler.device)
    if state.num_processes == 1:
        return local.cpu()
    from accelerate.utils import gather

    padded = torch.cat([local, local.new_zeros(size - len(local), *local.shape[1:])])
    gathered = gather(padded).view(state.num_processes, size, *local.shape[1:])
    order = [gathered[i % state.num_processes, i // state.num_processes] for i in range(len(prompts))]
    return torch.stack(order).cpu()


def settings_key(*settings) -> str:
    """The cache key of generated latents: 16 hex digits of the SHA-256 of the settings, space-separated as an
    f-string writes them, so that caches written before this function keep their keys."""
    return hashlib.sha256(" ".join(str(setting) for setting in settings).encode()).hexdigest()[:16]


def cached_latents(path: Path, key: str, make: Callable[[], Tensor]) -> Tensor:
    """Latents from ``path`` when it was written for ``key``, else made, written atomically by the main process and
    returned; every process returns the same tensor."""
    state = _accelerator()
    if path.is_file() and _cache_key_of(path) == key:
        return load_file(path)["latents"]
    latents = make()
    if state.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:   # a killed run never leaves a half-written cache behind
            save_file({"latents": latents.contiguous()}, str(tmp), metadata={"key": key})
    state.wait_for_everyone()
    return latents


def _cache_key_of(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get("key")


@torch.no_grad()
def score_latents(sampler: SDSampler, reward, latents: Tensor, prompts: list[str], batch_size: int) -> Tensor:
    """[N] float32 rewards of decoded latents (what the preference trainers report as reward_mean)."""
    from rewards import score

    scores = []
    for start in range(0, len(prompts), batch_size):
        images = sampler.decode(latents[start:start + batch_size].to(sampler.device))
        scores.append(score(reward, images, prompts[start:start + batch_size])[0].float().cpu())
    return torch.cat(scores)


def dpo_update(sampler: SDSampler, optimization: Optimization, winners: Tensor, losers: Tensor, prompts: list[str],
               timesteps: Tensor, preference_loss: PreferenceLoss, *, shared_noise: bool, generator: torch.Generator,
               reference: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict[str, Tensor]:
    """One micro-batch of a Diffusion-DPO-family loss on B (winner, loser) latent pairs: ``preference_loss`` maps the
    [B] denoising errors (policy winner, policy loser, reference winner, reference loser) to the loss and its stats
    (diffrl.preference: ``diffusion_dpo_loss`` for SPIN, ``pso_offline_loss`` for offline PSO, β bound).

    Both members of pair b are noised to timestep ``timesteps[b]`` (shared noise by default, Diffusion-DPO's form);
    the policy sees the 2B noisy latents in one UNet call with grad, the reference in one call without.
    ``reference`` is a context under which the UNet is the reference model; None: the base model (adapters off).
    """
    device, dtype = sampler.device, sampler.dtype
    clean = torch.cat([winners, losers]).to(device, dtype)
    noise = torch.randn(clean.shape, generator=generator).to(device, dtype)
    if shared_noise:
        noise = torch.cat([noise[:len(winners)]] * 2)
    t = torch.cat([timesteps, timesteps]).to(device)
    noisy, target = sampler.add_training_noise(clean, noise, t), sampler.training_target(clean, noise)
    embeds = sampler.encode_prompts(list(prompts))[0].repeat(2)
    with torch.no_grad(), (reference() if reference else contextlib.nullcontext()):
        reference_errors = denoising_errors(target, sampler.predict_training_target(noisy, t, embeds,
                                                                                    reference=reference is None))
    with optimization.accumulate():
        policy_errors = denoising_errors(target, sampler.predict_training_target(noisy, t, embeds))
        half = len(winners)
        loss, stats = preference_loss(policy_errors[:half], policy_errors[half:], reference_errors[:half],
                                      reference_errors[half:])
        grad_norm = optimization.step(loss)
    metrics = {"loss": loss.detach(), "preference_accuracy": stats.accuracy, "implicit_margin": stats.margin,
               "winner_error": policy_errors[:half].detach().mean(), "loser_error": policy_errors[half:].detach().mean()}
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    return metrics


@contextlib.contextmanager
def lora_values(params: list[torch.nn.Parameter], values: list[Tensor]):
    """The LoRA parameters temporarily set to ``values`` (a frozen earlier iteration): the one UNet serves as its own
    reference without a second copy. Use it only without a live graph through the parameters (reference calls come
    before the policy's forward)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for param, value in zip(params, values):
            param.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)

