"""`diffrl train | evaluate | grid | list`: the command line.

User mistakes exit with status 2 and one sentence, no traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130   # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after options: collect the `key=value` words argparse leaves over.
    args, extra = parser.parse_known_args(argv)
    unknown = [word for word in extra if word.startswith("-") or "=" not in word]
    if unknown or (extra and args.command != "train"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides += extra
    _quiet_libraries(getattr(args, "verbose", False))
    from diffrl.errors import NonFiniteError, UserInputError

    try:
        return args.run(args)
    except UserInputError as error:
        print(f"diffrl: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteError as error:
        print(f"diffrl: stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        if os.environ.get("RANK", "0") == "0":   # under `accelerate launch`, one line, not one per process
            print(f"diffrl: {_interrupted(args, interrupt)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into e.g. `head`: the reader left, which is not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffrl", description="Reward fine-tuning of text-to-image diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune a model from a YAML config")
    train.add_argument("config", help="YAML config file (see assets/configs/)")
    train.add_argument("overrides", nargs="*", metavar="key.path=value", help="override any config field")
    train.add_argument("--output-dir", help="run folder (default: runs/<config name>-<date>-<time>)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_verbose(train)
    train.set_defaults(run=_train)
    _add_evaluate_parser(commands)
    _add_grid_parser(commands)
    listing = commands.add_parser("list", help="trainers, rewards and built-in models, one line each")
    listing.set_defaults(run=_list)
    return parser


def _train(args) -> int:
    from diffrl.config import load_config
    from diffrl.errors import UserInputError

    config = load_config(args.config, args.overrides)  # before the heavy imports: typos answer at once
    if args.resume and not args.output_dir:
        raise UserInputError("--resume needs --output-dir naming the run folder to continue")
    from diffrl.training import train

    _library_bars(args)
    output_dir = Path(args.output_dir or f"runs/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = train(config, output_dir, resume=args.resume, quiet=args.quiet)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one summary, not one per process
        return 0
    if result.first_metrics and result.last_metrics:
        print(f"reward_mean: step {result.first_metrics['step']} {result.first_metrics['reward_mean']:.4f} -> "
              f"step {result.last_metrics['step']} {result.last_metrics['reward_mean']:.4f}")
        if windows := _first_and_last_windows(output_dir / "metrics.jsonl"):
            print(windows)
    print(f"metrics:    {output_dir / 'metrics.jsonl'}")
    print(f"grids:      {output_dir / 'grids'}")
    print(f"report:     {output_dir / 'report.html'}")
    if result.last_checkpoint:
        print(f"LoRA:       {result.last_checkpoint / 'pytorch_lora_weights.safetensors'}  "
              "(load with pipe.load_lora_weights(folder))")
    return 0


def _interrupted(args, interrupt: KeyboardInterrupt) -> str:
    """One line: what was saved, and for training the command that continues the run."""
    from diffrl.interruption import TrainingInterrupted

    if not isinstance(interrupt, TrainingInterrupted):
        return "interrupted"
    return f"{interrupt.summary}; continue with: {resume_command(args, interrupt.output_dir)}"


def resume_command(args, output_dir: Path) -> str:
    """The command line that resumes this run: the same config, overrides and flags, plus --resume."""
    program = "diffrl" if Path(sys.argv[0]).name == "diffrl" else "python3 -m diffrl"
    words = ["train", args.config, *args.overrides, "--output-dir", str(output_dir), "--resume"]
    words += [flag for flag, on in (("--quiet", args.quiet), ("--verbose", args.verbose)) if on]
    return f"{program} {shlex.join(words)}"


def _first_and_last_windows(metrics_file: Path) -> str | None:
    """One step's reward is one batch's, noisy with many prompts: also compare the means of the first and last
    tenth of the logged steps (from 20 steps on)."""
    import json

    rows = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    rewards = [row["reward_mean"] for row in rows if "skipped" not in row and "reward_mean" in row]
    if len(rewards) < 20:
        return None
    n = len(rewards) // 10
    return (f"             mean of the first {n} logged steps {sum(rewards[:n]) / n:.4f} -> "
            f"of the last {n} {sum(rewards[-n:]) / n:.4f}")


def _add_evaluate_parser(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="rewards and diversity of a base model and its checkpoints on fixed prompts and seeds",
        description="Writes eval.json, eval.csv, tradeoff.png and grid.png; the base model is the first row.")
    evaluate.add_argument("targets", nargs="+", metavar="CHECKPOINT_OR_RUN_DIR",
                          help="a run folder (base model + every checkpoint), a checkpoint folder, or a model")
    evaluate.add_argument("--samples-per-prompt", type=_positive_int, default=4, help="seeds per prompt (default 4)")
    evaluate.add_argument("--seed", type=int, default=0, help="first seed; sample j uses seed S+j (default 0)")
    evaluate.add_argument("--diversity", help="comma-separated metrics among pixel,latent,clip,lpips,dreamsim "
                          "(default: every one that can run here)")
    evaluate.add_argument("--clip-model", help="transformers CLIP (hub id or local copy) for the clip diversity "
                          "metric (default: the image encoder of a CLIP-based reward in --rewards)")
    evaluate.add_argument("--output-dir", help="default: <first run folder>/eval, else ./eval")
    _add_sampling_options(evaluate)
    evaluate.set_defaults(run=_evaluate)


def _add_grid_parser(commands) -> None:
    grid = commands.add_parser("grid", help="image grids: rows = checkpoints or models, columns = seeds",
                               description="One page per prompt; FILE.png for one prompt, FILE-1.png, FILE-2.png, "
                                           "... (prompt-file order) for several.")
    grid.add_argument("targets", nargs="+", metavar="CHECKPOINT_OR_MODEL",
                      help="a run folder (base model + every checkpoint), a checkpoint folder, or a model")
    grid.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds, one column each (default 0,1,2,3)")
    grid.add_argument("--output", help="PNG file (default: <first run folder>/grid.png, else ./grid.png)")
    _add_sampling_options(grid)
    grid.set_defaults(run=_grid, num_prompts_default=1)


def _add_sampling_options(parser) -> None:
    parser.add_argument("--prompts", help="prompt file, one per line (default: the run's prompt file)")
    parser.add_argument("--num-prompts", type=_positive_int, help="use the first N prompts (default: evaluate all, "
                        "grid 1)")
    parser.add_argument("--rewards", help="comma-separated reward names (default: the run's training reward)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="samples per batch (default 8)")
    parser.add_argument("--num-steps", type=_positive_int, help="sampling steps (default: the run's sample.num_steps)")
    parser.add_argument("--guidance-scale", type=float, help="CFG scale (default: the run's sample.guidance_scale)")
    parser.add_argument("--eta", type=float, help="DDIM eta (default: the run's sample.eta)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="model weight dtype (default fp32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_verbose(parser)


def _add_verbose(parser) -> None:
    parser.add_argument("--verbose", action="store_true", help="also show the loading bars and messages of "
                        "diffusers, transformers and huggingface_hub")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _evaluate(args) -> int:
    from diffrl.evaluation import evaluate, format_table, write_evaluation
    from diffrl.report import write_report

    targets, prompts, rewards, sample, device, dtype = _sampling_setup(args)
    seeds = list(range(args.seed, args.seed + args.samples_per_prompt))
    evaluation = evaluate(targets, prompts, seeds, rewards, sample, diversity=_names(args.diversity),
                          clip_model=args.clip_model, batch_size=args.batch_size, device=device, dtype=dtype,
                          quiet=args.quiet)
    output_dir = Path(args.output_dir) if args.output_dir else _in_first_run(targets, "eval")
    paths = write_evaluation(evaluation, output_dir)
    # Each evaluated run's report.html gains this evaluation (trade-off plot, grid, table).
    paths += [write_report(run_dir, output_dir) for run_dir in dict.fromkeys(
        target.run_dir for target in targets if target.run_dir is not None)]
    print(format_table(evaluation.rows))
    for note in evaluation.notes:
        print(f"note: {note}")
    print(f"wrote:      {', '.join(str(path) for path in paths)}")
    return 0


def _grid(args) -> int:
    from diffrl.errors import UserInputError
    from diffrl.evaluation import grid_pages, page_paths
    from diffrl.grids import save_image_atomic

    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise UserInputError(f"--seeds must be comma-separated integers such as 0,1,2,3, got {args.seeds!r}") from None
    targets, prompts, rewards, sample, device, dtype = _sampling_setup(args)
    pages = grid_pages(targets, prompts, seeds, rewards, sample, batch_size=args.batch_size, device=device,
                       dtype=dtype, quiet=args.quiet)
    output = Path(args.output) if args.output else _in_first_run(targets, "grid.png")
    for page, path in zip(pages, page_paths(output, len(pages))):
        save_image_atomic(page, path)
        print(f"wrote:      {path}")
    return 0


def _sampling_setup(args):
    """What evaluate and grid share: rows, prompts, rewards (loaded once), sampler settings, device and dtype."""
    import torch

    from diffrl.evaluation import default_rewards, first_config, load_rewards, resolve_targets, sample_settings
    from diffrl.training import load_prompts

    _library_bars(args)
    targets = resolve_targets(args.targets)
    config = first_config(targets)
    prompt_file = args.prompts or (config.prompts if config else "assets/prompts/simple.txt")
    prompts = load_prompts(prompt_file)[: args.num_prompts or getattr(args, "num_prompts_default", None)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rewards = load_rewards(_names(args.rewards) or default_rewards(targets), targets, device)
    sample = sample_settings(targets, num_steps=args.num_steps, guidance_scale=args.guidance_scale, eta=args.eta)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    return targets, prompts, rewards, sample, device, dtype


def _names(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def _in_first_run(targets, name: str) -> Path:
    """``name`` inside the first run folder among the targets, else in the current directory."""
    run_dir = next((target.run_dir for target in targets if target.run_dir is not None), None)
    return run_dir / name if run_dir else Path(name)


def _list(args) -> int:
    from diffrl.models import BUILTIN_MODELS
    from diffrl.trainers import TRAINERS
    from rewards import REWARDS, describe, weights_present

    print("trainers:")
    for name, (_, trainer_class) in TRAINERS.items():
        print(f"  {name:<18} {_first_line(trainer_class)}")
    print("rewards:")
    for name, reward_class in REWARDS.items():
        gradient = "differentiable" if reward_class.differentiable else "no gradient"
        present = weights_present(name)
        weights = "" if present is None else "weights: local" if present else "weights: absent"
        print(f"  {name:<18} {gradient:<15} {weights:<16} {describe(name)}")
    print("built-in models:")
    for name, (_, description) in BUILTIN_MODELS.items():
        print(f"  {name:<18} {description}")
    return 0


def _first_line(obj) -> str:
    return (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""


def _quiet_libraries(verbose: bool) -> None:
    """Library chatter (optional torchvision, safety-checker notes) is not for our users' terminals unless they pass
    --verbose. Set before the libraries are imported, which read these variables then."""
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _library_bars(args) -> None:
    """The libraries' loading bars ("Loading pipeline components", transformers' nested "Loading weights" whose
    cursor-up escapes litter logs, huggingface_hub's "Fetching N files" and downloads) only with --verbose; diffrl's
    own progress bar stays. Called once diffusers is imported anyway, since importing it takes seconds."""
    import huggingface_hub.utils
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    if args.verbose:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()
    else:
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


if __name__ == "__main__":
    sys.exit(main())
