"""(prompt, image) datasets for the preference trainers, encoded to VAE latents once and cached on disk.

Sources:
    a JSONL file         one {"prompt": ..., "image": "path"} per line; relative paths are relative to the file
    a folder             with metadata.jsonl in the Hugging Face imagefolder layout ({"file_name": ..., "text": ...}),
                         or else image files each with a same-named .txt caption beside it

Every image is checked before anything is encoded: a missing or unreadable image stops with its line and path,
rather than thousands of items being skipped silently. Latents are the VAE posterior's mean times the scaling factor
(deterministic, so a cache is exact), stored in safetensors under a name that hashes the images' bytes, the
resolution and the VAE's config: change any of them and the cache is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from torch import Tensor

from diffrl.errors import UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageRecord:
    prompt: str
    path: Path
    origin: str          # where the record came from, for error messages ("data.jsonl line 3")


def load_image_records(source: str | Path) -> list[ImageRecord]:
    """The (prompt, image path) records of a JSONL file or a folder, each image checked to open."""
    source = Path(source)
    if source.is_file() and source.suffix == ".jsonl":
        records = _jsonl_records(source, prompt_key="prompt", image_key="image")
    elif source.is_dir() and (source / "metadata.jsonl").is_file():
        records = _jsonl_records(source / "metadata.jsonl", prompt_key="text", image_key="file_name")
    elif source.is_dir():
        records = _caption_file_records(source)
    else:
        raise UserInputError(f"image dataset '{source}' is neither a .jsonl file nor a folder; give a JSONL of "
                             '{"prompt": ..., "image": ...} lines or a folder of images with .txt captions')
    if not records:
        raise UserInputError(f"image dataset '{source}' has no (prompt, image) pairs")
    for record in records:
        _check_image(record)
    return records


def _jsonl_records(path: Path, prompt_key: str, image_key: str) -> list[ImageRecord]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        origin = f"{path} line {number}"
        try:
            item = json.loads(line)
            prompt, image = item[prompt_key], item[image_key]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserInputError(f"{origin}: expected a JSON object with '{prompt_key}' and '{image_key}', got "
                                 f"{line[:80]!r}") from None
        records.append(ImageRecord(str(prompt), path.parent / image, origin))
    return records


def _caption_file_records(folder: Path) -> list[ImageRecord]:
    records = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise UserInputError(f"{image} has no caption: write its prompt to {caption.name}, or list the images "
                                 "in a metadata.jsonl")
        records.append(ImageRecord(caption.read_text(encoding="utf-8").strip(), image, str(image)))
    return records


def _check_image(record: ImageRecord) -> None:
    if not record.path.is_file():
        raise UserInputError(f"{record.origin}: image {record.path} does not exist")
    try:
        with Image.open(record.path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise UserInputError(f"{record.origin}: image {record.path} cannot be read ({error})") from None


def image_tensor(path: Path, resolution: int) -> Tensor:
    """[3, R, R] in [-1, 1]: the shorter side resized to R, then centre-cropped (the usual SD preprocessing)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0


def cache_key(records: list[ImageRecord], resolution: int, vae) -> str:
    """A hash of every image's bytes and prompt, the resolution and the VAE's config."""
    digest = hashlib.sha256(f"{resolution}\n{json.dumps(dict(vae.config), sort_keys=True, default=str)}".encode())
    for record in records:
        digest.update(record.prompt.encode() + b"\0" + hashlib.sha256(record.path.read_bytes()).digest())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_latents(records: list[ImageRecord], vae, resolution: int, cache_dir: Path | None = None,
                   batch_size: int = 8) -> Tensor:
    """[N, C, R/f, R/f] scaled latents of the records' images, from ``cache_dir`` when it holds them."""
    cache = None if cache_dir is None else Path(cache_dir) / f"latents-{cache_key(records, resolution, vae)}.safetensors"
    if cache is not None and cache.is_file():
        return load_file(cache)["latents"]
    parts = []
    for start in range(0, len(records), batch_size):
        pixels = torch.stack([image_tensor(record.path, resolution) for record in records[start:start + batch_size]])
        posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        parts.append((posterior.mean * vae.config.scaling_factor).float().cpu())
    latents = torch.cat(parts)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_suffix(".tmp")
        save_file({"latents": latents.contiguous()}, str(temporary))
        os.replace(temporary, cache)   # atomic: a killed run never leaves a half-written cache behind
    return latents
