"""ShapesWorld benchmark: every trainer with a `assets/configs/shapes-<trainer>.yaml`, one budget of reward queries.

    python3 scripts/shapesworld_benchmark.py                      # train what is missing, evaluate, write the table
    python3 scripts/shapesworld_benchmark.py --trainers draft,ddpo --reward-queries 640 --output runs/bench

Each trainer trains its demo config for as many steps as it takes to score `--reward-queries` images (the configs'
batch sizes differ; DRaFT-LV's extra scores are not counted), in `<output>/<trainer>/` (a finished run is reused,
an interrupted one resumed). Then the base model and each run's last checkpoint sample the same prompts with the same
seeds (DDIM eta 0, the configs' steps and CFG) on the training prompts and on held-out ones, and are scored with the
exact scorer (`shapes_accuracy`), the soft one (`shapes_alignment`), pixel diversity and the layout statistics of
diffrl.shapesworld_statistics (total-variation distances to the data's sizes, positions and backgrounds; the size
ratio > 1 when objects are inflated), all per prompt and then averaged, by the code of `diffrl evaluate`. Writes benchmark.json, benchmark.md (the table), tradeoff.png and grid.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import diffrl  # noqa: E402,F401  first: installs the torchvision fix before diffusers can import torchvision
import torch  # noqa: E402

from diffrl.checkpoint import list_checkpoints  # noqa: E402
from diffrl.config import load_config  # noqa: E402
from diffrl.evaluation import Target, evaluate, sampled_batches  # noqa: E402
from diffrl.grids import image_grid  # noqa: E402
from diffrl.trainers import TRAINERS  # noqa: E402
from diffrl.training import train  # noqa: E402
from rewards.shapes import ShapesAccuracyReward, ShapesAlignmentReward  # noqa: E402

CONFIGS = REPO_ROOT / "assets" / "configs"
TRAIN_PROMPTS = REPO_ROOT / "assets" / "prompts" / "shapes-single-train.txt"
HELD_OUT_PROMPTS = REPO_ROOT / "assets" / "prompts" / "shapes-single-heldout.txt"
LAYOUT_KEYS = ("size_tv", "x_tv", "y_tv", "background_tv", "size_ratio")


def available_trainers() -> list[str]:
    return [name for name in TRAINERS if (CONFIGS / f"shapes-{name}.yaml").is_file()]


def images_per_step(config) -> int:
    per_prompt = config.loop.samples_per_prompt if config.trainer == "loop" else 1
    return config.sample.batch_size * per_prompt


def train_with_budget(trainer: str, reward_queries: int, output: Path) -> dict:
    """Train (or finish, or reuse) one trainer's run; returns its steps, images scored and seconds per step."""
    base = load_config(CONFIGS / f"shapes-{trainer}.yaml", [])
    steps = max(reward_queries // images_per_step(base), 1)
    every = max(steps // 2, 1)
    config = load_config(CONFIGS / f"shapes-{trainer}.yaml",
                         [f"train.steps={steps}", f"log.checkpoint_every={every}", f"log.grid_every={every}"])
    run_dir, timing_file = output / trainer, output / trainer / "benchmark_timing.json"
    done = list_checkpoints(run_dir)
    if not (done and done[-1].name == f"step-{steps:06d}" and timing_file.is_file()):
        started = time.monotonic()
        train(config, run_dir, resume=(run_dir / "config.yaml").is_file(), quiet=False)   # a started run goes on
        timing_file.write_text(json.dumps({"seconds": time.monotonic() - started, "steps": steps}))
    timing = json.loads(timing_file.read_text())
    return {"trainer": trainer, "steps": steps, "images_scored": steps * images_per_step(config),
            "seconds_per_step": timing["seconds"] / timing["steps"], "checkpoint": list_checkpoints(run_dir)[-1],
            "sample": config.sample}


def score(targets: list[Target], prompts: list[str], seeds: list[int], sample) -> dict[str, dict]:
    """Per target, through `diffrl evaluate`'s code: the mean exact/soft reward over prompts, the mean per-prompt
    pixel diversity and the mean per-prompt layout distances to the data."""
    rewards = {"shapes_accuracy": ShapesAccuracyReward(), "shapes_alignment": ShapesAlignmentReward()}
    evaluation = evaluate(targets, prompts, seeds, rewards, sample, diversity=["pixel"], batch_size=64, quiet=True)
    return {row["name"]: {**{name: reward["mean"] for name, reward in row["rewards"].items()},
                          "pixel_diversity": row["diversity"]["pixel"]["mean"],
                          **{key: row["diversity"][f"layout:{key}"]["mean"] for key in LAYOUT_KEYS}}
            for row in evaluation.rows}


def first_seed_images(targets: list[Target], prompts: list[str], sample) -> dict[str, torch.Tensor]:
    """Each target's seed-0 image of every prompt, for the review grid."""
    return {batch.target.name: batch.trajectory.images.float().cpu()
            for batch in sampled_batches(targets, prompts, [0], sample, batch_size=len(prompts), device="cpu",
                                         dtype=torch.float32)}


def markdown_table(rows: list[dict]) -> str:
    header = ("| model | steps | images scored | s/step | train acc. | held-out acc. | held-out soft | "
              "pixel div. | size TV | x TV | y TV | background TV | size ratio |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        held = row["held_out"]
        cells = [row["name"], row.get("steps", "—"), row.get("images_scored", "—"),
                 f"{row['seconds_per_step']:.1f}" if "seconds_per_step" in row else "—",
                 f"{row['train']['shapes_accuracy']:.3f}", f"{held['shapes_accuracy']:.3f}",
                 f"{held['shapes_alignment']:.3f}", f"{held['pixel_diversity']:.3f}",
                 *(f"{held[key]:.2f}" for key in LAYOUT_KEYS)]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def tradeoff_plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for index, row in enumerate(rows):
        held = row["held_out"]
        marker = "*" if row["name"] == "base" else "o"
        axes.scatter(held["pixel_diversity"], held["shapes_accuracy"], s=140 if marker == "*" else 50,
                     marker=marker, color=f"C{index}", label=row["name"])
    axes.set_xlabel("pixel diversity (held-out prompts, higher = more varied)")
    axes.set_ylabel("shapes_accuracy (held-out prompts)")
    axes.legend(fontsize=8)
    figure.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", default=",".join(available_trainers()))
    parser.add_argument("--reward-queries", type=int, default=640, help="images each trainer may score (default 640)")
    parser.add_argument("--samples-per-prompt", type=int, default=8, help="evaluation seeds per prompt (default 8)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "runs" / "shapes-benchmark")
    args = parser.parse_args(argv)
    if args.samples_per_prompt < 2:
        parser.error("--samples-per-prompt must be at least 2: diversity compares samples of one prompt")
    runs = [train_with_budget(name, args.reward_queries, args.output) for name in args.trainers.split(",")]
    sample = dataclasses.replace(runs[0]["sample"], eta=0.0)   # one deterministic sampler for every model
    targets = [Target("shapes", name="base")] + [Target("shapes", run["checkpoint"], name=run["trainer"])
                                                 for run in runs]
    seeds = list(range(args.samples_per_prompt))
    read = lambda path: [line for line in path.read_text().splitlines() if line.strip()]
    train_scores = score(targets, read(TRAIN_PROMPTS), seeds, sample)
    held_scores = score(targets, read(HELD_OUT_PROMPTS), seeds, sample)
    rows = [{"name": "base"}] + [{"name": run["trainer"], **{k: v for k, v in run.items() if k in
                                                            ("steps", "images_scored", "seconds_per_step")}}
                                 for run in runs]
    for row in rows:
        row["train"], row["held_out"] = train_scores[row["name"]], held_scores[row["name"]]
    args.output.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    (args.output / "benchmark.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    (args.output / "benchmark.md").write_text(markdown_table(rows))
    tradeoff_plot(rows, args.output / "tradeoff.png")
    held = read(HELD_OUT_PROMPTS)
    first_images = first_seed_images(targets, held, sample)
    images = torch.cat([first_images[row["name"]] for row in rows])
    image_grid(images, held * len(rows), columns=len(held), title="held-out prompts, seed 0",
               row_labels=[row["name"] for row in rows]).save(args.output / "grid.png")
    print(markdown_table(rows), end="")
    print(f"machine: {machine}\nwrote: {args.output}/benchmark.json, benchmark.md, tradeoff.png, grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
