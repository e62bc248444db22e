"""`diffrl evaluate` and `diffrl grid` on a 2-checkpoint tiny run trained in the test."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffrl.cli import main
from diffrl.errors import UserInputError
from diffrl.evaluation import (evaluate, grid_pages, page_paths, resolve_targets, sample_settings, sample_with_seeds,
                               use_checkpoint, write_evaluation)
from diffrl.models import load_pipeline
from diffrl.sampler import SDSampler
from diffrl.training import train
from rewards import load_reward
from tests.fixtures import fast_config

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "a photo of a cat"]
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """Two DRaFT steps at a high learning rate, a checkpoint after each: base and checkpoints differ visibly."""
    run_dir = tmp_path_factory.mktemp("run")
    train(fast_config("train.steps=2", "log.checkpoint_every=1", "log.grid_every=100", "train.learning_rate=1e-2"),
          run_dir, quiet=True)
    return run_dir


def _evaluate(run_dir: Path, batch_size: int = 4):
    targets = resolve_targets([str(run_dir)])
    rewards = {"brightness": load_reward("brightness"), "contrast": load_reward("contrast")}
    return evaluate(targets, PROMPTS, SEEDS, rewards, sample_settings(targets), batch_size=batch_size, quiet=True)


@pytest.fixture(scope="module")
def evaluation(tiny_run):
    return _evaluate(tiny_run)


def test_evaluate_writes_the_documented_files_and_keys(evaluation, tmp_path):
    paths = write_evaluation(evaluation, tmp_path)
    assert [path.name for path in paths] == ["eval.json", "eval.csv", "tradeoff.png", "grid.png"]
    written = json.loads((tmp_path / "eval.json").read_text())
    assert set(written) == {"sampler", "notes", "checkpoints"} and written["sampler"]["num_steps"] == 4
    rows = written["checkpoints"]
    assert [(row["name"], row["step"]) for row in rows] == [("base", 0), ("step-000001", 1), ("step-000002", 2)]
    for row in rows:
        assert set(row) == {"name", "step", "model", "run", "checkpoint", "samples", "prompts", "seeds", "rewards",
                            "diversity"}
        assert row["samples"] == 6 and row["seeds"] == SEEDS and row["prompts"] == PROMPTS
        assert set(row["rewards"]) == {"brightness", "contrast"} and set(row["diversity"]) == {"pixel", "latent"}
        assert set(row["rewards"]["brightness"]) == {"mean", "std", "standard_error", "per_prompt"}
        assert len(row["rewards"]["brightness"]["per_prompt"]) == len(PROMPTS)
        assert set(row["diversity"]["pixel"]) == {"mean", "standard_error", "per_prompt"}
    assert any("clip diversity skipped" in note for note in written["notes"])
    with open(tmp_path / "eval.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [line["name"] for line in table] == ["base", "step-000001", "step-000002"]
    assert {"brightness_mean", "brightness_se", "diversity_pixel_mean", "diversity_latent_se"} <= set(table[0])
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 3 * 128 and grid.height > 3 * 128   # 3 seeds wide, 3 rows (base + 2 checkpoints) high
    assert Image.open(tmp_path / "tradeoff.png").size[0] > 300


def test_same_seeds_give_the_same_numbers_and_batching_does_not_matter(tiny_run, evaluation):
    again = _evaluate(tiny_run)
    assert again.rows == evaluation.rows
    one_by_one = _evaluate(tiny_run, batch_size=1)
    for row, expected in zip(one_by_one.rows, evaluation.rows):
        assert row["rewards"]["brightness"]["mean"] == pytest.approx(expected["rewards"]["brightness"]["mean"],
                                                                     rel=1e-5)


def test_different_checkpoints_give_different_numbers(evaluation):
    brightness = [row["rewards"]["brightness"]["mean"] for row in evaluation.rows]
    assert brightness[0] < brightness[1] < brightness[2]   # DRaFT on brightness: each step brighter than the last
    pixel = [row["diversity"]["pixel"]["mean"] for row in evaluation.rows]
    assert len(set(pixel)) == 3


def test_lora_swap_gives_the_same_images_as_a_fresh_load(tiny_run):
    first, second = sorted((tiny_run / "checkpoints").iterdir())
    sample = sample_settings(resolve_targets([str(tiny_run)]))

    def images(pipe):
        sampler = SDSampler(pipe, sample.num_steps, sample.guidance_scale, sample.eta, gradient_checkpointing=False)
        return sample_with_seeds(sampler, PROMPTS, [0, 1]).images

    swapped = load_pipeline("tiny")
    use_checkpoint(swapped, second)
    second_images = images(swapped)
    use_checkpoint(swapped, first)
    first_after_swap = images(swapped)
    use_checkpoint(swapped, None)
    base_after_swap = images(swapped)
    fresh = load_pipeline("tiny")
    use_checkpoint(fresh, first)
    assert torch.equal(first_after_swap, images(fresh))
    assert torch.equal(base_after_swap, images(load_pipeline("tiny")))
    assert not torch.allclose(first_after_swap, second_images)


def test_targets_from_a_checkpoint_a_model_and_a_missing_path(tiny_run):
    checkpoint = tiny_run / "checkpoints" / "step-000001"
    targets = resolve_targets([str(checkpoint), str(tiny_run)])
    assert [(target.name, target.step) for target in targets] == [("base", 0), ("step-000001", 1), ("step-000002", 2)]
    assert resolve_targets(["tiny"])[0].checkpoint is None and resolve_targets(["tiny"])[0].name == "tiny"
    with pytest.raises(UserInputError, match="is not a run folder"):
        resolve_targets([str(tiny_run / "nowhere")])


def test_grid_pages_one_per_prompt_with_rows_of_checkpoints(tiny_run):
    targets = resolve_targets([str(tiny_run / "checkpoints" / "step-000002")])
    pages = grid_pages(targets, PROMPTS, [0, 1], {"brightness": load_reward("brightness")},
                       sample_settings(targets), quiet=True)
    assert len(pages) == 2 and pages[0].size == pages[1].size and pages[0] != pages[1]
    assert [path.name for path in page_paths(Path("out/g.png"), 2)] == ["g-1.png", "g-2.png"]
    assert page_paths(Path("out/g.png"), 1) == [Path("out/g.png")]


def test_cli_evaluate_and_grid_in_a_subprocess(tiny_run, tmp_path):
    """evaluate in a subprocess (the real console entry), grid in-process (the same code path, without paying for a
    second interpreter start)."""
    evaluate_args = ["evaluate", str(tiny_run), "--num-prompts=2", "--samples-per-prompt=2", "--quiet",
                     f"--output-dir={tmp_path / 'eval'}"]
    grid_args = ["grid", str(tiny_run), "--num-prompts=2", "--seeds=0,1", "--quiet", f"--output={tmp_path / 'g.png'}"]
    done = subprocess.run([sys.executable, "-m", "diffrl.cli", *evaluate_args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "step-000002" in done.stdout and "brightness" in done.stdout
    for name in ("eval.json", "eval.csv", "tradeoff.png", "grid.png"):
        assert (tmp_path / "eval" / name).is_file()
    assert "Evaluation" in (tiny_run / "report.html").read_text()   # the run's report gains the evaluation
    assert main(grid_args) == 0
    assert (tmp_path / "g-1.png").is_file() and (tmp_path / "g-2.png").is_file()


@pytest.mark.parametrize("args, expected", [
    (["evaluate", "{run}", "--rewards", "nope"], "unknown reward 'nope'; valid rewards: aesthetic, brightness"),
    (["evaluate", "{run}/nowhere"], "is not a run folder"),
    (["evaluate", "{run}", "--samples-per-prompt", "1"], "at least 2 samples per prompt"),
    (["evaluate", "{run}", "--diversity", "pixel,sharpness"], "valid diversity metrics: clip, dreamsim, latent"),
    (["evaluate", "{run}", "--prompts", "{run}/absent.txt"], "absent.txt"),
    (["grid", "{run}", "--seeds", "zero,one"], "--seeds must be comma-separated integers"),
    (["grid", "/no/such/checkpoint"], "is not a run folder"),
])
def test_bad_input_exits_2_with_one_sentence(args, expected, tiny_run, capsys):
    code = main([arg.format(run=tiny_run) for arg in args] + ["--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err and err.startswith("diffrl: error:") and len(err.splitlines()) == 1


def test_tradeoff_draws_one_line_per_run_starting_at_its_base():
    from diffrl.tradeoff import _series

    def row(run, step):
        return {"model": "tiny", "run": run, "step": step, "checkpoint": None if step == 0 else f"{run}/ck{step}"}

    rows = [row("/r/a", 0), row("/r/a", 1), row("/r/a", 2), row("/r/b", 1)]
    series = _series(rows)
    assert [(label, [(r["run"], r["step"]) for r in members]) for label, members in series] == [
        ("a", [("/r/a", 0), ("/r/a", 1), ("/r/a", 2)]), ("b", [("/r/a", 0), ("/r/b", 1)])]
    assert _series([row(None, 0)]) == [("tiny", [row(None, 0)])]


def test_shapesworld_prompts_add_layout_distances_to_the_data(tiny_run):
    """Every prompt a ShapesWorld prompt: each row also gets layout:* columns (TV distances to the data in [0, 1]);
    a prompt outside the grammar (PROMPTS has one) leaves them out, as above."""
    from diffrl.shapesworld import samples_for_prompt
    from diffrl.shapesworld_statistics import data_layouts, layout, layout_distances

    targets = resolve_targets([str(tiny_run)])[:1]
    prompts = ["a red circle", "two blue squares"]
    rows = evaluate(targets, prompts, [0, 1], {"brightness": load_reward("brightness")}, sample_settings(targets),
                    quiet=True).rows
    layouts = {name: value for name, value in rows[0]["diversity"].items() if name.startswith("layout:")}
    assert set(layouts) == {f"layout:{key}" for key in ("size_tv", "x_tv", "y_tv", "background_tv", "count_tv",
                                                        "size_ratio")}
    assert all(0.0 <= layouts[f"layout:{key}"]["mean"] <= 1.0 for key in ("size_tv", "x_tv", "y_tv", "count_tv"))
    # The tiny model draws noise, not shapes: its samples' object counts are far from the data's (one or two objects).
    assert layouts["layout:count_tv"]["mean"] > 0.5
    # Data against more data of the same prompts is close: the reference is a sample of the right distribution.
    reference = data_layouts(prompts)
    fresh = layout(samples_for_prompt(prompts[0], 32, seed=99).images)
    assert layout_distances(fresh, reference[0])["size_tv"] < 0.35 and data_layouts(PROMPTS) is None
    assert not any(name.startswith("layout:") for name in _evaluate(tiny_run).rows[0]["diversity"])
