"""(prompt, image) datasets for the preference trainers, encoded to VAE latents once and cached on disk.

Sources:
    a JSONL file         one {"prompt": ..., "image": "path"} per line; relative paths are relative to the file
    a folder             with metadata.jsonl in the Hugging Face imagefolder layout ({"file_name": ..., "text": ...}),
                         or else image files each with a same-named .txt caption beside it
    a datasets dataset   a folder written by Dataset/DatasetDict.save_to_disk, or a hub id (owner/name) loaded from
                         the local Hugging Face cache; a prompt column and an image column (see load_image_records),
                         or the Pick-a-Pic layout of preference pairs, of which the preferred image is kept

Every image is checked before anything is encoded: a missing or unreadable image stops with its line (or row) and
path, rather than thousands of items being skipped silently. Latents are the VAE posterior's mean times the scaling
factor (deterministic, so a cache is exact), stored in safetensors under a name that hashes the images' bytes, the
resolution and the VAE's config: change any of them and the cache is rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from torch import Tensor

from diffrl.atomic_files import atomic_path
from diffrl.errors import UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROMPT_COLUMNS = ("prompt", "caption", "text")
IMAGE_COLUMNS = ("image", "jpg", "png")
PICKAPIC_COLUMNS = ("jpg_0", "jpg_1", "label_0", "label_1")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ImageRecord:
    """A prompt and its image: a file at ``path``, or encoded image bytes in ``data`` (then ``path`` is None)."""

    prompt: str
    path: Path | None
    origin: str          # where the record came from, for error messages ("data.jsonl line 3", "dataset x row 7")
    data: bytes | None = field(default=None, repr=False)

    def __post_init__(self):
        if (self.path is None) == (self.data is None):
            raise ValueError(f"{self.origin}: an ImageRecord needs exactly one of path and data")

    def read_bytes(self) -> bytes:
        """The encoded image: the file's bytes or ``data``."""
        return self.data if self.data is not None else self.path.read_bytes()

    def open(self) -> Image.Image:
        """The image as PIL opens it (lazily); use it as a context manager."""
        return Image.open(io.BytesIO(self.data) if self.data is not None else self.path)


def load_image_records(source: str | Path, *, split: str = "train", prompt_column: str | None = None,
                       image_column: str | None = None) -> list[ImageRecord]:
    """The (prompt, image) records of ``source`` (see the module docstring), each image checked to open.

    ``split``, ``prompt_column`` and ``image_column`` apply to Hugging Face datasets only. Unless given, the prompt column
    is the first of PROMPT_COLUMNS the dataset has and the image column the first of IMAGE_COLUMNS. Image cells may be
    PIL images (the datasets Image feature), {"bytes", "path"} dicts or encoded bytes. A dataset in the Pick-a-Pic
    layout (caption, jpg_0, jpg_1, label_0, label_1), given no image_column, yields one record per pair holding the
    preferred image (jpg_0 where label_0 == 1, jpg_1 where label_1 == 1); ties (0.5 each) are left out, and how many
    were is printed to stderr.
    """
    path = Path(source)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        records = _dataset_records(_load_from_disk(path, split), str(source), prompt_column, image_column)
    elif path.is_file() and path.suffix == ".jsonl":
        records = _jsonl_records(path, prompt_key="prompt", image_key="image")
    elif path.is_dir() and (path / "metadata.jsonl").is_file():
        records = _jsonl_records(path / "metadata.jsonl", prompt_key="text", image_key="file_name")
    elif path.is_dir():
        records = _caption_file_records(path)
    elif not path.exists() and path.suffix != ".jsonl" and _HUB_ID.fullmatch(str(source)):
        records = _dataset_records(_load_from_hub(str(source), split), str(source), prompt_column, image_column)
    else:
        raise UserInputError(f"image dataset '{source}' is neither a .jsonl file, a folder nor a Hugging Face dataset "
                             'id (owner/name); give a JSONL of {"prompt": ..., "image": ...} lines, a folder of '
                             "images with .txt captions, or a folder written by datasets' save_to_disk")
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


def _import_datasets():
    try:
        import datasets  # here, not at the top: it takes seconds to import and only dataset sources need it
    except ImportError:
        raise UserInputError("reading a Hugging Face dataset needs the datasets package: pip install datasets") from None
    return datasets


def _load_from_disk(folder: Path, split: str):
    datasets = _import_datasets()
    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserInputError(f"dataset {folder} has no split {split!r}; its splits are: {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded


def _load_from_hub(name: str, split: str):
    datasets = _import_datasets()
    try:
        return datasets.load_dataset(name, split=split)
    except ValueError as error:
        if "split" not in str(error).lower():
            raise
        raise UserInputError(f"dataset {name} has no split {split!r} ({error})") from None
    except OSError as error:       # ConnectionError, DatasetNotFoundError and a missing cache are all OSErrors
        raise UserInputError(f"image dataset '{name}' is not a local path and could not be found in the local Hugging "
                             f"Face cache or downloaded ({error}); where there is network, run datasets.load_dataset"
                             f"('{name}', split='{split}').save_to_disk(FOLDER) and give FOLDER instead") from None


def _column(kind: str, given: str | None, defaults: tuple[str, ...], columns: list[str], source: str) -> str:
    if given is None:
        given = next((name for name in defaults if name in columns), None)
        if given is None:
            raise UserInputError(f"dataset {source} has none of the {kind} columns {', '.join(defaults)}; its columns "
                                 f"are {', '.join(columns)}: set {kind}_column (the trainer's dataset_{kind}_column) "
                                 f"to the one that holds the {kind}s")
    elif given not in columns:
        raise UserInputError(f"dataset {source} has no {kind} column {given!r}; its columns are {', '.join(columns)}: "
                             f"set {kind}_column (the trainer's dataset_{kind}_column) to one of them")
    return given


def _dataset_records(dataset, source: str, prompt_column: str | None, image_column: str | None) -> list[ImageRecord]:
    columns = list(dataset.column_names)
    prompt_column = _column("prompt", prompt_column, PROMPT_COLUMNS, columns, source)
    if image_column is None and all(name in columns for name in PICKAPIC_COLUMNS):
        return _preferred_image_records(dataset, source, prompt_column)
    image_column = _column("image", image_column, IMAGE_COLUMNS, columns, source)
    rows = _rows(dataset, [prompt_column, image_column])
    return [_dataset_record(row[prompt_column], row[image_column], f"dataset {source} row {index}")
            for index, row in enumerate(rows)]


def _preferred_image_records(dataset, source: str, prompt_column: str) -> list[ImageRecord]:
    records, ties = [], 0
    for index, row in enumerate(_rows(dataset, [prompt_column, *PICKAPIC_COLUMNS])):
        preferred = "jpg_0" if row["label_0"] == 1 else "jpg_1" if row["label_1"] == 1 else None
        if preferred is None:
            ties += 1
            continue
        records.append(_dataset_record(row[prompt_column], row[preferred], f"dataset {source} row {index}"))
    if ties:
        print(f"dataset {source}: left out {ties} of {ties + len(records)} Pick-a-Pic pairs that are ties (neither "
              "label_0 nor label_1 is 1); each other pair gives its preferred image", file=sys.stderr)
    return records


def _rows(dataset, columns: list[str]):
    """The rows of ``columns``, with Image features left encoded: decoding every image here would be wasted."""
    datasets = _import_datasets()
    dataset = dataset.select_columns(columns)
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    for batch in dataset.iter(batch_size=256):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def _dataset_record(prompt, cell, origin: str) -> ImageRecord:
    if prompt is None:
        raise UserInputError(f"{origin}: the prompt is missing")
    if isinstance(cell, dict):
        cell = cell.get("bytes") if cell.get("bytes") is not None else cell.get("path")
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return ImageRecord(str(prompt), None, origin, bytes(cell))
    if isinstance(cell, (str, os.PathLike)):
        return ImageRecord(str(prompt), Path(cell), origin)
    if isinstance(cell, Image.Image):
        encoded = io.BytesIO()
        cell.save(encoded, format="PNG")      # lossless, so the latents are of the very pixels the dataset holds
        return ImageRecord(str(prompt), None, origin, encoded.getvalue())
    raise UserInputError(f"{origin}: expected an image (a datasets Image, encoded bytes or a {{'bytes', 'path'}} dict), "
                         f"got {'nothing' if cell is None else type(cell).__name__}")


def _check_image(record: ImageRecord) -> None:
    if record.data is None and not record.path.is_file():
        raise UserInputError(f"{record.origin}: image {record.path} does not exist")
    try:
        with record.open() as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        image = "image" if record.path is None else f"image {record.path}"
        raise UserInputError(f"{record.origin}: {image} cannot be read ({error})") from None


def image_tensor(image: ImageRecord | Path | str, resolution: int) -> Tensor:
    """[3, R, R] in [-1, 1] of a record's image or an image file: the shorter side resized to R, then centre-cropped
    (the usual SD preprocessing)."""
    with image.open() if isinstance(image, ImageRecord) else Image.open(image) as image:
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
        digest.update(record.prompt.encode() + b"\0" + hashlib.sha256(record.read_bytes()).digest())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_latents(records: list[ImageRecord], vae, resolution: int, cache_dir: Path | None = None,
                   batch_size: int = 8, encode: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """[N, ...] latents of the records' images, from ``cache_dir`` when it holds them. ``encode`` maps pixels in
    [-1, 1] to the model family's latents (ModelFamily.encode_images); default: the VAE's scaled posterior mean."""
    from diffrl.families.autoencoder import encode_pixels
    cache = None if cache_dir is None else Path(cache_dir) / f"latents-{cache_key(records, resolution, vae)}.safetensors"
    if cache is not None and cache.is_file():
        return load_file(cache)["latents"]
    parts = []
    for start in range(0, len(records), batch_size):
        pixels = torch.stack([image_tensor(record, resolution) for record in records[start:start + batch_size]])
        parts.append((encode(pixels) if encode else encode_pixels(vae, pixels)).float().cpu())
    latents = torch.cat(parts)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:   # a killed run never leaves a half-written cache behind
            save_file({"latents": latents.contiguous()}, str(tmp))
    return latents
