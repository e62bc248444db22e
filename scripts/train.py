"""Thin entry point: `python scripts/train.py CONFIG.yaml [...]` is `diffrl train CONFIG.yaml [...]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffrl.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
