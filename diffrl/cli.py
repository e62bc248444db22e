"""`diffrl train | list`: the command line. User mistakes exit with status 2 and one sentence, no traceback."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after options: collect the `key=value` words argparse leaves over.
    args, extra = parser.parse_known_args(argv)
    unknown = [word for word in extra if word.startswith("-") or "=" not in word]
    if unknown or (extra and args.command != "train"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides += extra
    _quiet_libraries()
    from diffrl.errors import NonFiniteError, UserInputError

    try:
        return args.run(args)
    except UserInputError as error:
        print(f"diffrl: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteError as error:
        print(f"diffrl: stopped: {error}", file=sys.stderr)
        return 1
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
    train.set_defaults(run=_train)
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

    output_dir = Path(args.output_dir or f"runs/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = train(config, output_dir, resume=args.resume, quiet=args.quiet)
    if result.first_metrics and result.last_metrics:
        print(f"reward_mean: step {result.first_metrics['step']} {result.first_metrics['reward_mean']:.4f} -> "
              f"step {result.last_metrics['step']} {result.last_metrics['reward_mean']:.4f}")
    print(f"metrics:    {output_dir / 'metrics.jsonl'}")
    print(f"grids:      {output_dir / 'grids'}")
    if result.last_checkpoint:
        print(f"LoRA:       {result.last_checkpoint / 'pytorch_lora_weights.safetensors'}  "
              "(load with pipe.load_lora_weights(folder))")
    return 0


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


def _quiet_libraries() -> None:
    """Library chatter (optional torchvision, safety-checker notes) is not for our users' terminals."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


if __name__ == "__main__":
    sys.exit(main())
