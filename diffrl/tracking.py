"""What a run reports while it trains: metrics.jsonl, the experiment trackers (TensorBoard, wandb) and the metrics
averaged over processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from diffrl.atomic_files import write_text_atomic

TRACKER_PROJECT = "diffrl"  # the wandb project; also the TensorBoard subfolder: DIR/tensorboard/diffrl/


def start_trackers(accelerator: Accelerator, tracker: str, config_data: dict, output_dir: Path) -> None:
    """TensorBoard logs go to DIR/tensorboard/; a wandb run is named after the run folder and keeps its files there.
    ``config_data``: the resolved config as plain data (diffrl.config.config_to_dict)."""
    if tracker == "none":
        return
    accelerator.init_trackers(TRACKER_PROJECT, config=flat_config(config_data),
                              init_kwargs={"wandb": {"name": output_dir.resolve().name, "dir": str(output_dir)}})


def flat_config(config_data: dict) -> dict[str, bool | int | float | str]:
    """The resolved config as one level of dotted keys, the form tracker hyperparameter tables take: lists and None
    become their JSON text, because TensorBoard's add_hparams accepts only scalars and strings."""
    flat = {}

    def visit(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)

    visit("", config_data)
    return flat


def log_grid_to_trackers(accelerator: Accelerator, grid, step: int) -> None:
    """The grid as an image under the tag "grid". accelerate's own log_images wants image batches for TensorBoard,
    hence the writer's add_image with an HWC array there; wandb takes a wandb.Image."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("grid", np.asarray(grid), global_step=step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"grid": wandb.Image(grid, caption=f"step {step}")}, step=step)


def mean_over_processes(accelerator: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1:
        return metrics
    values = torch.tensor(list(metrics.values()), device=accelerator.device)
    return dict(zip(metrics, accelerator.reduce(values, reduction="mean").tolist()))


def append_metrics(path: Path, metrics: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(metrics) + "\n")


def drop_metrics_after(path: Path, step: int) -> None:
    """A run that died after its last checkpoint logged steps that the resumed run repeats; keep one row per step
    (and drop a last line cut short)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in rows if (logged := logged_step(line)) is not None and logged <= step]
    if len(kept) != len(rows):
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def logged_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line cut short by a kill mid-write."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
