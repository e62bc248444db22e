"""The run folder before training starts: whether it can take a new run or a resumed one (checked before any model
is loaded), and rewinding its logs to the step a resumed run restarts from."""

from __future__ import annotations

from pathlib import Path

from diffrl.checkpoint import STEP_PATTERN, checkpoint_name, list_checkpoints
from diffrl.errors import UserInputError
from diffrl.tracking import drop_metrics_after, logged_step

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")   # what `diffrl train` writes first


def check_run_folder(output_dir: Path, *, resume: bool) -> None:
    """A new run needs a folder without another run's progress; --resume needs a run to continue."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserInputError(f"--output-dir {output_dir} is a file; give a folder for the run")
    if resume:
        _check_resumable(output_dir)
        return
    checkpoints = list_checkpoints(output_dir)
    logged = len(_steps_in(output_dir / "metrics.jsonl"))
    if checkpoints or logged:
        held = (f"checkpoints up to {checkpoints[-1].name}" if checkpoints else
                f"metrics.jsonl with {logged} logged step{'s' * (logged != 1)}")
        raise UserInputError(f"{output_dir} already holds a run ({held}); pass --resume to continue that run or "
                             "choose another --output-dir")


def _check_resumable(output_dir: Path) -> None:
    if not output_dir.is_dir():
        raise UserInputError(f"nothing to resume in {output_dir}: the folder does not exist (drop --resume to start a "
                             "new run there)")
    if not any((output_dir / name).exists() for name in RUN_FILES):
        raise UserInputError(f"nothing to resume in {output_dir}: it holds no diffrl run (no config.yaml, "
                             "metrics.jsonl or checkpoints/); drop --resume to start a new run there")


def check_steps_left(output_dir: Path, restored_step: int, steps: int) -> None:
    """A resumed run whose checkpoint already reaches train.steps has nothing to train. (Checked once the newest
    checkpoint that loads is known: a newer corrupt one is set aside and does not count.)"""
    if restored_step >= steps:
        raise UserInputError(f"nothing to resume in {output_dir}: its latest checkpoint, "
                             f"{checkpoint_name(restored_step)}, already reaches train.steps={steps}; pass a larger "
                             "train.steps to train further")


def rewind_logs(output_dir: Path, step: int) -> str:
    """Drop what a run logged after ``step`` (metrics rows, grids), which the resumed run writes again; returns the
    sentence saying where the run resumes."""
    metrics = output_dir / "metrics.jsonl"
    logged = _steps_in(metrics)
    drop_metrics_after(metrics, step)
    for grid in (output_dir / "grids").glob("step-*.png"):
        if (match := STEP_PATTERN.match(grid.stem)) and int(match.group(1)) > step:
            grid.unlink()
    if step > 0:
        dropped = sum(1 for logged_step in logged if logged_step > step)
        after = f"; dropped {_rows(dropped)} logged after it" if dropped else ""
        return f"resuming from {checkpoint_name(step)} ({output_dir / 'checkpoints' / checkpoint_name(step)}){after}"
    dropped = f"; dropped the {_rows(len(logged))} logged without one" if logged else ""
    return f"no checkpoint in {output_dir / 'checkpoints'}: starting the run over from step 0{dropped}"


def _rows(count: int) -> str:
    return f"{count} metrics row{'s' * (count != 1)}"


def _steps_in(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    steps = [logged_step(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [step for step in steps if step is not None]
