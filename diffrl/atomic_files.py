"""Atomic file writes: write a hidden temporary file next to the target, then rename it over the target.

A rename within one folder is atomic, so a reader, or a run resumed after a kill, finds the old file or the new one,
never half of one. (Checkpoints are folders; diffrl.checkpoint renames those the same way.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path for a writer that needs a file name (PIL, safetensors): renamed onto ``path`` when the block
    ends, removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")   # the process id: two processes never share one
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
