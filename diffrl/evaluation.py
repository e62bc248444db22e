"""`diffrl evaluate` and `diffrl grid`: the base model and its checkpoints on fixed prompts and fixed seeds.

Every row (a base model, then each of its LoRA checkpoints) samples the same prompts with the same seeds. Sample j of
each prompt draws its initial latents and every step's noise from its own generator seeded with seeds[j], so the
numbers depend neither on the batch size nor on the row order, and differences between rows come from the weights.
A pipeline is loaded once per model; checkpoints are swapped in and out of its UNet. Rewards are loaded once.
Outputs (docs/contracts.md): eval.json, eval.csv, tradeoff.png, grid.png.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffrl.atomic_files import write_text_atomic
from diffrl.checkpoint import STEP_PATTERN, list_checkpoints
from diffrl.config import Config, SampleConfig, load_config
from diffrl.diversity import DiversityMetrics, build_diversity_metrics, mean_and_standard_error
from diffrl.errors import UserInputError
from diffrl.families import family_of
from diffrl.grids import image_grid, save_image_atomic
from diffrl.lora import LORA_WEIGHTS_NAME, has_lora, load_pipeline_lora
from diffrl.models import BUILTIN_MODELS, SINGLE_FILE_SUFFIXES, load_model, load_pipeline
from diffrl.sampler import SDSampler
from diffrl.shapesworld_statistics import LayoutSample, data_layouts, layout, layout_distances
from diffrl.trajectory import Trajectory

GRID_COLUMNS = 8  # grid.png shows at most this many seeds of the first prompt


@dataclass(frozen=True)
class Target:
    """One row of an evaluation: a model, with one LoRA checkpoint or without (the base model)."""

    model: str
    checkpoint: Path | None = None
    run_dir: Path | None = field(default=None, compare=False)
    config: Config | None = field(default=None, compare=False, hash=False)
    name: str = field(default="", compare=False, hash=False)

    @property
    def step(self) -> int | None:
        """The training step of a checkpoint, 0 for a run's base model, None for a model named on its own."""
        if self.checkpoint is None:
            return 0 if self.run_dir is not None else None
        match = STEP_PATTERN.match(self.checkpoint.name)
        return int(match.group(1)) if match else None


# -- what to evaluate ------------------------------------------------------------------------------------------------
def resolve_targets(specs: list[str]) -> list[Target]:
    """Rows for run folders, checkpoint folders and models: per model its base first, then its checkpoints (a run
    folder's in training order, named ones in the order given); a row named twice is evaluated once."""
    found = list(dict.fromkeys(target for spec in specs for target in _expand(spec)))
    models = list(dict.fromkeys(target.model for target in found))
    rows = sorted(found, key=lambda target: (models.index(target.model), target.checkpoint is not None))
    runs = {target.run_dir for target in rows if target.checkpoint is not None}
    return [_named(target, several_models=len(models) > 1, several_runs=len(runs) > 1) for target in rows]


def _named(target: Target, several_models: bool, several_runs: bool) -> Target:
    if target.checkpoint is None:
        name = target.model if several_models or target.run_dir is None else "base"
    else:
        name = f"{target.run_dir.name}/{target.checkpoint.name}" if several_runs else target.checkpoint.name
    return Target(target.model, target.checkpoint, target.run_dir, target.config, name)


def _expand(spec: str) -> list[Target]:
    path = Path(spec).expanduser()
    if path.exists():  # one spelling per folder, so that a row named twice is found twice
        path = path.resolve()
    if (path / "config.yaml").is_file():  # a run folder: its base model and every checkpoint
        config = load_config(path / "config.yaml", [])
        return [Target(config.model, None, path, config),
                *(Target(config.model, checkpoint, path, config) for checkpoint in list_checkpoints(path))]
    if (path / LORA_WEIGHTS_NAME).is_file():  # one checkpoint: its run's config names the model
        run_dir = path.parent.parent
        if not (run_dir / "config.yaml").is_file():
            raise UserInputError(f"checkpoint {spec!r} is not inside a run folder ({run_dir / 'config.yaml'} is "
                                 "missing), so its base model is unknown")
        config = load_config(run_dir / "config.yaml", [])
        return [Target(config.model, None, run_dir, config), Target(config.model, path, run_dir, config)]
    if _is_model(spec, path):
        return [Target(spec)]
    raise UserInputError(f"{spec!r} is not a run folder (with config.yaml), a checkpoint folder (with "
                         f"{LORA_WEIGHTS_NAME}) or a model (built-in: {', '.join(BUILTIN_MODELS)}; a hub id; a local "
                         "diffusers folder)")


def _is_model(spec: str, path: Path) -> bool:
    if spec in BUILTIN_MODELS or (path / "model_index.json").is_file():
        return True
    if path.suffix in SINGLE_FILE_SUFFIXES:
        return path.is_file()
    # A hub id is owner/name; "runs/demo" with a local runs/ folder is a mistyped path, not a model to download.
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not path.parent.exists() and not spec.startswith((".", "/", "~"))


def first_config(targets: list[Target]) -> Config | None:
    """The config of the first run among the targets: it sets the sampler, the prompts and the default rewards."""
    return next((target.config for target in targets if target.config is not None), None)


def sample_settings(targets: list[Target], **overrides) -> SampleConfig:
    """The first run's sampler settings (config defaults for bare models), with the options that were given."""
    config = first_config(targets) or load_config(None, [])
    given = {key: value for key, value in overrides.items() if value is not None}
    settings = {**asdict(config.sample), **given}
    if settings["eval_guidance_scale"] is not None:   # the run trained with one guidance and is looked at with another
        settings["guidance_scale"] = settings["eval_guidance_scale"]
    return SampleConfig(**settings)


def default_rewards(targets: list[Target]) -> list[str]:
    """The reward(s) the first run trained on, each component of a mix separately; brightness without a run."""
    config = first_config(targets)
    if config is None:
        return ["brightness"]
    return [config.reward] if isinstance(config.reward, str) else list(config.reward)


def load_rewards(names: list[str], targets: list[Target], device: torch.device) -> dict[str, object]:
    """Each named reward, loaded once, with the run's local weight paths (reward_weights)."""
    from rewards import load_reward

    config = first_config(targets)
    weights = config.reward_weights if config else {}
    rewards = {}
    for name in names:
        reward = load_reward(name, {key: value for key, value in weights.items() if key == name})
        if isinstance(reward, torch.nn.Module):
            reward.requires_grad_(False).eval().to(device)
        rewards[name] = reward
    return rewards


# -- sampling the rows -----------------------------------------------------------------------------------------------
def use_checkpoint(pipe, checkpoint: Path | None) -> None:
    """Put this checkpoint's LoRA on the pipeline's denoiser in place of the previous one (None: the base model)."""
    if has_lora(family_of(pipe).denoiser):
        pipe.unload_lora_weights()
    if checkpoint is not None:
        load_pipeline_lora(pipe, checkpoint)


def pipelines(targets: list[Target], device, dtype, vae_slicing: bool = False) -> Iterator[tuple[Target, object]]:
    """Each target with its pipeline: loaded once per model, the LoRA swapped between checkpoints."""
    pipe, loaded = None, None
    for target in targets:
        if _model_key(target) != loaded:
            pipe = None  # let the previous model go before the next one loads
            pipe, loaded = load_target_model(target, dtype, device), _model_key(target)
            if vae_slicing:
                pipe.vae.enable_slicing()
        use_checkpoint(pipe, target.checkpoint)
        yield target, pipe


def _model_key(target: Target) -> tuple:
    config = target.config
    extras = () if config is None else (config.base_lora, config.base_lora_scale, config.vae, config.train.vae_float32)
    return (target.model, *extras)


def load_target_model(target: Target, dtype, device):
    """A run's model as it trained it (its fused base_lora and VAE choices); a model named on its own as is."""
    config = target.config
    if config is None:
        return load_pipeline(target.model, dtype=dtype, device=device)
    return load_model(config.model, base_lora=config.base_lora, base_lora_scale=config.base_lora_scale,
                      vae=config.vae, vae_float32=config.train.vae_float32, dtype=dtype, device=device)


@torch.no_grad()
def sample_with_seeds(sampler: SDSampler, prompts: list[str], seeds: list[int]) -> Trajectory:
    """One sample per (prompt, seed): its initial latents and step noise come from a generator of its own seed."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    latents = sampler.initial_latents(len(seeds), generators)
    return sampler.sample(prompts, initial_latents=latents, generator=generators)


@dataclass
class Batch:
    target: Target
    prompt_indices: list[int]
    seeds: list[int]
    trajectory: Trajectory


def sampled_batches(targets: list[Target], prompts: list[str], seeds: list[int], sample: SampleConfig,
                    batch_size: int, device, dtype) -> Iterator[Batch]:
    """Every target on every (prompt, seed), prompt-major, in batches of ``batch_size`` samples."""
    pairs = [(index, seed) for index in range(len(prompts)) for seed in seeds]
    sampler = None
    for target, pipe in pipelines(targets, device, dtype, sample.vae_slicing):
        if sampler is None or sampler.pipe is not pipe:  # one sampler per pipeline: the LoRA swap happens under it
            sampler = SDSampler.from_config(pipe, sample, gradient_checkpointing=False)
        for start in range(0, len(pairs), batch_size):
            indices, batch_seeds = zip(*pairs[start:start + batch_size])
            traj = sample_with_seeds(sampler, [prompts[index] for index in indices], list(batch_seeds))
            yield Batch(target, list(indices), list(batch_seeds), traj)


def score_batch(rewards: dict[str, object], batch: Batch) -> dict[str, list[float]]:
    traj = batch.trajectory
    with torch.no_grad():
        return {name: reward(traj.images, traj.prompts).float().cpu().tolist() for name, reward in rewards.items()}


def progress(batches: Iterator[Batch], total: int, quiet: bool, desc: str) -> tqdm:
    return tqdm(batches, total=total, disable=quiet, desc=desc, dynamic_ncols=True)


# -- evaluate --------------------------------------------------------------------------------------------------------
@dataclass
class RowAccumulator:
    """One row's per-prompt rewards and diversities, filled batch by batch; a prompt's images are dropped as soon
    as its diversity is computed (except those of the grid prompt)."""

    target: Target
    samples_per_prompt: int
    rewards: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    diversity: dict[str, list[float]] = field(default_factory=dict)
    pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    grid_images: list[torch.Tensor] = field(default_factory=list)
    grid_rewards: list[dict[str, float]] = field(default_factory=list)
    data_layouts: list[LayoutSample] | None = None   # ShapesWorld prompts: the data's layout of each prompt

    def add(self, batch: Batch, scores: dict[str, list[float]], metrics: DiversityMetrics) -> None:
        images, latents = batch.trajectory.images, batch.trajectory.latents[:, -1]
        for row, prompt_index in enumerate(batch.prompt_indices):
            for name, values in scores.items():
                self.rewards.setdefault(name, {}).setdefault(prompt_index, []).append(values[row])
            if prompt_index == 0 and len(self.grid_images) < GRID_COLUMNS:
                self.grid_images.append(images[row].cpu())
                self.grid_rewards.append({name: values[row] for name, values in scores.items()})
            samples = self.pending.setdefault(prompt_index, [])
            samples.append((images[row], latents[row]))
            if len(samples) == self.samples_per_prompt:
                del self.pending[prompt_index]
                stacked_images, stacked_latents = (torch.stack(part) for part in zip(*samples))
                for name, value in metrics.per_prompt(stacked_images, stacked_latents).items():
                    self.diversity.setdefault(name, []).append(value)
                if self.data_layouts is not None:   # how far this prompt's layouts are from the data's
                    distances = layout_distances(layout(stacked_images), self.data_layouts[prompt_index])
                    for name, value in distances.items():
                        self.diversity.setdefault(f"layout:{name}", []).append(value)

    def summary(self, prompts: list[str], seeds: list[int]) -> dict:
        target = self.target
        rewards = {}
        for name, by_prompt in self.rewards.items():
            per_prompt = [sum(values) / len(values) for _, values in sorted(by_prompt.items())]
            every = torch.tensor([value for values in by_prompt.values() for value in values], dtype=torch.float64)
            mean, error = mean_and_standard_error(per_prompt)
            rewards[name] = {"mean": mean, "std": float(every.std(correction=1)) if len(every) > 1 else 0.0,
                             "standard_error": error, "per_prompt": per_prompt}
        diversity = {name: dict(zip(("mean", "standard_error"), mean_and_standard_error(values)), per_prompt=values)
                     for name, values in self.diversity.items()}
        return {"name": target.name, "step": target.step, "model": target.model,
                "run": str(target.run_dir) if target.run_dir else None,
                "checkpoint": str(target.checkpoint) if target.checkpoint else None,
                "samples": len(prompts) * len(seeds), "prompts": prompts, "seeds": seeds,
                "rewards": rewards, "diversity": diversity}


@dataclass
class Evaluation:
    rows: list[dict]
    sample: SampleConfig
    notes: list[str]
    grid: object   # PIL image: the first prompt, rows = targets, columns = seeds

    def as_json(self) -> dict:
        return {"sampler": asdict(self.sample), "notes": self.notes, "checkpoints": self.rows}


def evaluate(targets: list[Target], prompts: list[str], seeds: list[int], rewards: dict[str, object],
             sample: SampleConfig, *, diversity: list[str] | None = None, clip_model: str | None = None,
             batch_size: int = 8, device="cpu", dtype=torch.float32, quiet: bool = False) -> Evaluation:
    """Rewards and diversity of every target on prompts × seeds; ``diversity`` names metrics (None: all available),
    ``clip_model`` the CLIP of the clip metric (None: the first CLIP-based reward's)."""
    if len(seeds) < 2:
        raise UserInputError("diversity needs at least 2 samples per prompt; raise --samples-per-prompt")
    metrics = build_diversity_metrics(diversity, rewards, device, clip_model)
    reference = data_layouts(prompts)
    rows = {target: RowAccumulator(target, len(seeds), data_layouts=reference) for target in targets}
    batches_per_row = math.ceil(len(prompts) * len(seeds) / batch_size)
    bar = progress(sampled_batches(targets, prompts, seeds, sample, batch_size, device, dtype),
                   len(targets) * batches_per_row, quiet, "evaluate")
    for batch in bar:
        scores = score_batch(rewards, batch)
        rows[batch.target].add(batch, scores, metrics)
        first = next(iter(scores))
        bar.set_postfix(row=batch.target.name, **{first: f"{sum(scores[first]) / len(scores[first]):.4g}"})
    summaries = [rows[target].summary(prompts, seeds) for target in targets]
    grid = checkpoint_grid(prompts[0], [rows[target] for target in targets], seeds[:GRID_COLUMNS])
    return Evaluation(summaries, sample, metrics.notes, grid)


def checkpoint_grid(prompt: str, rows: list[RowAccumulator], seeds: list[int]):
    """Rows = targets, columns = seeds, one prompt; each cell captioned with its seed and every reward."""
    images = torch.stack([image for row in rows for image in row.grid_images])
    captions = [f"seed {seed}: " + ", ".join(f"{name}={value:.4g}" for name, value in scores.items())
                for row in rows for seed, scores in zip(seeds, row.grid_rewards)]
    return image_grid(images, captions, columns=len(seeds), title=f'"{prompt}"',
                      row_labels=[row.target.name for row in rows])


def write_evaluation(evaluation: Evaluation, output_dir: Path) -> list[Path]:
    """eval.json, eval.csv, tradeoff.png and grid.png in ``output_dir``; returns their paths."""
    from diffrl.tradeoff import plot_tradeoff

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / name for name in ("eval.json", "eval.csv", "tradeoff.png", "grid.png")]
    write_text_atomic(paths[0], json.dumps(evaluation.as_json(), indent=2) + "\n")
    write_text_atomic(paths[1], _csv_text(evaluation.rows))
    save_image_atomic(plot_tradeoff(evaluation.rows), paths[2])
    save_image_atomic(evaluation.grid, paths[3])
    return paths


def _csv_text(rows: list[dict]) -> str:
    """One line per row: name, step, model, samples, then <reward>_{mean,std,se} and diversity_<metric>_{mean,se}."""
    import io

    table = []
    for row in rows:
        line = {"name": row["name"], "step": row["step"], "model": row["model"], "samples": row["samples"]}
        for name, stats in row["rewards"].items():
            line |= {f"{name}_mean": stats["mean"], f"{name}_std": stats["std"], f"{name}_se": stats["standard_error"]}
        for name, stats in row["diversity"].items():
            line |= {f"diversity_{name}_mean": stats["mean"], f"diversity_{name}_se": stats["standard_error"]}
        table.append(line)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def format_table(rows: list[dict]) -> str:
    """The numbers of an evaluation as a plain-text table: mean ± standard error over prompts."""
    columns = [f"{name}" for name in rows[0]["rewards"]] + [f"div:{name}" for name in rows[0]["diversity"]]
    widths = [max(22, len(column) + 2) for column in columns]   # long names (div:layout:...) keep a gap
    lines = [f"{'checkpoint':<16}" + "".join(column.rjust(width) for column, width in zip(columns, widths))]
    for row in rows:
        stats = list(row["rewards"].values()) + list(row["diversity"].values())
        cells = [f"{value['mean']:.4f} ± {value['standard_error']:<6.4f}" for value in stats]
        lines.append(f"{row['name']:<16}" + "".join(cell.rjust(width) for cell, width in zip(cells, widths)))
    return "\n".join(lines)


# -- grid ------------------------------------------------------------------------------------------------------------
def grid_pages(targets: list[Target], prompts: list[str], seeds: list[int], rewards: dict[str, object],
               sample: SampleConfig, *, batch_size: int = 8, device="cpu", dtype=torch.float32,
               quiet: bool = False) -> list:
    """One page per prompt: rows = targets, columns = seeds, the same prompt and seed down each column."""
    cells: dict[int, list[tuple[torch.Tensor, str]]] = {index: [] for index in range(len(prompts))}
    total = len(targets) * math.ceil(len(prompts) * len(seeds) / batch_size)
    for batch in progress(sampled_batches(targets, prompts, seeds, sample, batch_size, device, dtype), total, quiet,
                          "grid"):
        scores = score_batch(rewards, batch)
        for row, (index, seed) in enumerate(zip(batch.prompt_indices, batch.seeds)):
            caption = f"seed {seed}: " + ", ".join(f"{name}={values[row]:.4g}" for name, values in scores.items())
            cells[index].append((batch.trajectory.images[row].cpu(), caption))
    labels = [target.name for target in targets]
    return [image_grid(torch.stack([image for image, _ in page]), [caption for _, caption in page],
                       columns=len(seeds), title=f'"{prompts[index]}"', row_labels=labels)
            for index, page in cells.items()]


def page_paths(output: Path, pages: int) -> list[Path]:
    """FILE.png for one page; FILE-1.png, FILE-2.png, ... (one per prompt, in prompt-file order) for several."""
    output = Path(output)
    if pages == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(1, pages + 1)]
