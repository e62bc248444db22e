"""Where reward models' published weights come from, and how they are read without running code from them.

Order: a local path from config (`reward_weights.<reward>`), else the Hugging Face cache (no network), else a
download into that cache. Any failure is one UserInputError sentence naming the file, its hub repo and the config key
that points at a local copy. Files are read with safetensors, or `torch.load(weights_only=True)` for pickles;
transformers models load with remote code off (never `trust_remote_code`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from diffrl.errors import UserInputError

Loaded = TypeVar("Loaded")

# What `from_pretrained` reads besides config.json, in the order transformers prefers them.
PRETRAINED_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                           "pytorch_model.bin.index.json")


def resolve_weight_file(filename: str, hub_repo: str, config_key: str, local_path: str | None = None, *,
                        subfolder: str | None = None) -> Path:
    """The local path of one weight file: `local_path` (the file, or a folder holding it), else from the hub."""
    if local_path is not None:
        path = _local_file(Path(local_path).expanduser(), filename)
        if path is None:
            raise UserInputError(f"{config_key} is {local_path!r}, which is neither {filename} nor a folder holding "
                                 f"it; download it with `hf download {hub_repo} {_repo_path(filename, subfolder)}`")
        return path
    from huggingface_hub import hf_hub_download

    cached = _cached_file(hub_repo, filename, subfolder)
    if cached is not None:
        return cached
    try:
        return Path(hf_hub_download(hub_repo, filename, subfolder=subfolder))
    except OSError as error:  # offline, not cached, no network, gated or missing repo: all OSError subclasses
        raise missing_weights_error(_repo_path(filename, subfolder), hub_repo, config_key) from error


def load_pretrained(load: Callable[..., Loaded], hub_id: str, config_key: str, local_path: str | None = None,
                    **kwargs) -> Loaded:
    """`load(source, **kwargs)` (e.g. CLIPModel.from_pretrained) from a local folder, else the hub id: the cache
    first, so that a machine without network does not wait on retries, then a download."""
    if local_path is not None:
        return _load_local_copy(load, hub_id, config_key, local_path, **kwargs)
    try:
        return load(hub_id, local_files_only=True, **kwargs)
    except OSError:
        pass  # not (completely) in the cache
    try:
        return load(hub_id, **kwargs)
    except OSError as error:
        raise missing_weights_error(None, hub_id, config_key) from error


def missing_weights_error(filename: str | None, hub_repo: str, config_key: str) -> UserInputError:
    what = f"{filename} from the Hugging Face repo {hub_repo}" if filename else f"the Hugging Face repo {hub_repo}"
    command = f"hf download {hub_repo} {filename}" if filename else f"hf download {hub_repo}"
    target = f"/path/to/{Path(filename).name}" if filename else "/path/to/a/local/copy"
    return UserInputError(f"{what} is neither in the local cache nor downloadable now; download it ({command}) "
                          f"or set {config_key}: {target}")


def weights_present(filename: str, hub_repo: str, local_path: str | None = None, *,
                    subfolder: str | None = None) -> bool:
    """Whether resolve_weight_file would succeed without network."""
    if local_path is not None:
        return _local_file(Path(local_path).expanduser(), filename) is not None
    return _cached_file(hub_repo, filename, subfolder) is not None


def pretrained_present(hub_id: str, local_path: str | None = None) -> bool:
    """Whether load_pretrained would find config.json and weights without network."""
    if local_path is not None:
        folder = Path(local_path).expanduser()
        return (folder / "config.json").is_file() and any((folder / f).is_file() for f in PRETRAINED_WEIGHT_FILES)
    return (_cached_file(hub_id, "config.json") is not None
            and any(_cached_file(hub_id, f) is not None for f in PRETRAINED_WEIGHT_FILES))


def folder_holds(local_path: str | None, filename: str) -> bool:
    """Whether `local_path` is a folder holding `filename` (a local copy that also carries a secondary part)."""
    return local_path is not None and (Path(local_path).expanduser() / filename).is_file()


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Tensors from a .safetensors file, or from a pickle that torch.load(weights_only=True) accepts."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f"{path} cannot be read as a tensor checkpoint (safetensors, or torch.load with "
                             f"weights_only=True, which refuses pickled code): {reason}") from error


def load_checkpoint_into(module: nn.Module, state_dict: dict[str, Tensor], path: Path, what: str) -> None:
    """module.load_state_dict(state_dict), strict; a file of another model is the user's mistake, said in one line."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    reshaped = [key for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    if missing or unexpected or reshaped:
        examples = ", ".join((missing + unexpected + reshaped)[:3])
        raise UserInputError(f"{path} is not {what}: {len(missing)} keys missing, {len(unexpected)} unexpected and "
                             f"{len(reshaped)} of another shape (e.g. {examples})")
    module.load_state_dict(state_dict)


def _load_local_copy(load: Callable[..., Loaded], hub_id: str, config_key: str, local_path: str, **kwargs) -> Loaded:
    folder = Path(local_path).expanduser()
    problem = "is not a folder"
    if folder.is_dir():  # checked first: transformers would take a missing folder's name for a hub id and download
        try:
            return load(str(folder), **kwargs)
        except OSError as error:
            problem = f"cannot be loaded ({str(error).strip().splitlines()[0]})"
    raise UserInputError(f"{config_key} is {local_path!r}, which {problem}; it must be a copy of the Hugging Face "
                         f"repo {hub_id}, e.g. made with `hf download {hub_id} --local-dir PATH`")


def _local_file(path: Path, filename: str) -> Path | None:
    if path.is_dir():
        path = path / filename
    return path if path.is_file() else None


def _cached_file(hub_repo: str, filename: str, subfolder: str | None = None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_repo, _repo_path(filename, subfolder))
    return Path(found) if isinstance(found, str) else None   # None: unknown; a sentinel: known to be absent


def _repo_path(filename: str, subfolder: str | None) -> str:
    return f"{subfolder}/{filename}" if subfolder else filename
