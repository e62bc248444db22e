"""The real command line in a subprocess, and every user mistake giving status 2 and one sentence."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from diffrl.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "assets" / "configs" / "tiny-draft.yaml")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffrl.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_train_smoke_in_a_subprocess(tmp_path):
    done = _cli("train", DEMO, "train.steps=2", "sample.num_steps=2", "log.grid_prompts=1", "--quiet",
                "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "metrics:" in done.stdout and "pytorch_lora_weights.safetensors" in done.stdout
    assert "reward_mean: step 1" in done.stdout
    assert (tmp_path / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors").is_file()


def test_list_in_a_subprocess():
    done = _cli("list")
    assert done.returncode == 0
    for name in ("draft", "brightness", "compressibility", "tiny"):
        assert name in done.stdout


def test_user_error_in_a_subprocess_has_no_traceback():
    done = _cli("train", DEMO, "trainer=nope")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "valid trainers: adjoint_matching, ddpo, dpok, draft, loop" in done.stderr


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "broken.yaml").write_text("model: tiny\nsample: {num_steps: 3\n")
    (tmp_path / "no_prompts.yaml").write_text(f"prompts: {tmp_path / 'nowhere.txt'}\n")
    return tmp_path


@pytest.mark.parametrize("args, expected", [
    ([DEMO, "trainer=nope"], "unknown trainer 'nope'; valid trainers: adjoint_matching, ddpo, dpok, draft, loop"),
    ([DEMO, "reward=nope"], "valid rewards:"),
    ([DEMO, "sample.num_step=3"], "unknown config key 'sample.num_step'"),
    (["{tmp}/no_prompts.yaml"], "prompt file"),
    (["{tmp}/broken.yaml"], "broken.yaml"),
    (["{tmp}/absent.yaml"], "absent.yaml"),
    ([DEMO, "reward=compressibility"], "not differentiable"),
    ([DEMO, "--resume"], "--output-dir"),
    ([DEMO, "train.lr_scheduler=cosine_wobble"], "valid lr_schedulers:"),
])
def test_bad_input_exits_2_with_one_sentence(args, expected, bad_files, capsys):
    code = main(["train", *[arg.format(tmp=bad_files) for arg in args], "--quiet",
                 *([] if "--resume" in args else ["--output-dir", str(bad_files / "run")])])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err and err.startswith("diffrl: error:") and len(err.splitlines()) == 1


def test_loading_shows_no_library_bars_or_torch_dtype_warning_unless_verbose(tmp_path, capsys):
    grid = ["grid", "shapes", "--num-steps", "1", "--seeds", "0", "--rewards", "brightness", "--quiet",
            "--output", str(tmp_path / "grid.png")]   # shapes loads with from_pretrained, as hub models do
    assert main([*grid, "--verbose"]) == 0
    assert "Loading pipeline components" in capsys.readouterr().err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(grid) == 0
    assert not [warning for warning in caught if "torch_dtype" in str(warning.message)]
    err = capsys.readouterr().err
    assert "Loading" not in err and "\x1b[A" not in err and "it/s" not in err


def _run_folder(kind: str, folder: Path) -> None:
    """Run folders that --resume (or a new run) must refuse before loading any model."""
    if kind == "file":
        folder.write_text("not a folder\n")
    elif kind == "empty":
        folder.mkdir()
    elif kind == "metrics only":
        folder.mkdir()
        (folder / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5, "loss": -0.5}\n')


@pytest.mark.parametrize("kind, resume, expected", [
    ("missing", True, "nothing to resume in {dir}: the folder does not exist (drop --resume to start a new run there)"),
    ("empty", True, "nothing to resume in {dir}: it holds no diffrl run (no config.yaml, metrics.jsonl or "
                    "checkpoints/); drop --resume to start a new run there"),
    ("file", True, "--output-dir {dir} is a file; give a folder for the run"),
    ("file", False, "--output-dir {dir} is a file; give a folder for the run"),
    ("metrics only", False, "{dir} already holds a run (metrics.jsonl with 1 logged step); pass --resume to continue "
                            "that run or choose another --output-dir"),
], ids=["missing", "empty", "file", "file-new-run", "metrics-only-new-run"])
def test_run_folders_that_cannot_take_the_run_exit_2_with_one_sentence(kind, resume, expected, tmp_path, capsys):
    folder = tmp_path / "run"
    _run_folder(kind, folder)
    code = main(["train", DEMO, "train.steps=2", "--quiet", "--output-dir", str(folder), *(["--resume"] * resume)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"diffrl: error: {expected.format(dir=folder)}"


def test_summary_compares_the_first_and_last_tenth_of_the_steps(tmp_path):
    import json

    from diffrl.cli import _first_and_last_windows

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward_mean": float(s)} for s in range(1, 21)]
    rows.insert(5, {"step": 6, "skipped": "loss became non-finite"})   # skipped steps have no reward to average
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # 20 rewards 1..20: the first 2 average 1.5, the last 2 average 19.5
    assert _first_and_last_windows(metrics).split() == ["mean", "of", "the", "first", "2", "logged", "steps",
                                                         "1.5000", "->", "of", "the", "last", "2", "19.5000"]
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows[:10]))
    assert _first_and_last_windows(metrics) is None
