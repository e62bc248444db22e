"""Labelled image grids for human review: rows = prompts (or checkpoints), columns = seeds, captions below."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 128  # tiny models make 32 px images; enlarge them (nearest) so that people can see them


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL RGB."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def image_grid(images: torch.Tensor, captions: list[str], columns: int, title: str | None = None) -> Image.Image:
    """Images [N, 3, H, W] in [0, 1] laid out ``columns`` wide, each with its caption underneath."""
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    cells = [to_pil(image) for image in images]
    scale = max(1, -(-MIN_CELL // max(cells[0].size)))
    width, height = cells[0].width * scale, cells[0].height * scale
    font = ImageFont.load_default()
    wrap = max(8, width // 7)
    caption_lines = [textwrap.wrap(text, wrap)[:4] or [""] for text in captions]
    caption_height = 12 * max(len(lines) for lines in caption_lines) + 6
    title_height = 20 if title else 0
    rows = -(-len(cells) // columns)
    grid = Image.new("RGB", (columns * width, title_height + rows * (height + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    for index, (cell, lines) in enumerate(zip(cells, caption_lines)):
        x, y = (index % columns) * width, title_height + (index // columns) * (height + caption_height)
        grid.paste(cell.resize((width, height), Image.NEAREST), (x, y))
        for line_number, line in enumerate(lines):
            draw.text((x + 3, y + height + 3 + 12 * line_number), line, fill="black", font=font)
    return grid


def save_image_atomic(image: Image.Image, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    image.save(tmp, format="PNG")
    tmp.replace(path)
