"""A fake Hugging Face cache, laid out as huggingface_hub lays out a real one, so loading from the cache is tested
without network: <cache>/models--<org>--<name>/refs/main holds a commit id, snapshots/<commit>/ holds the files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path_factory, monkeypatch):
    """A function (repo_id, source) -> snapshot folder that puts a file or a folder's files into an empty cache."""
    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("hub-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def add(repo_id: str, source: Path) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / COMMIT
        snapshot.mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
        for file in (sorted(source.iterdir()) if source.is_dir() else [source]):
            if file.is_file():
                shutil.copy(file, snapshot / file.name)
        return snapshot

    return add
