"""Labelled image grids for human review: rows = prompts (or checkpoints), columns = seeds, captions below."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from diffrl.atomic_files import atomic_path

MIN_CELL = 128  # tiny models make 32 px images; enlarge them (nearest) so that people can see them
FONT_SIZE_PER_CELL_WIDTH = 1 / 18  # about 32 characters span one cell at any image size: readable at a glance
MIN_FONT_SIZE = 10


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL RGB."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def label_font(cell_width: int) -> ImageFont.ImageFont:
    """A font whose size grows with the cell, so labels stay legible next to 128 px and 1024 px images alike."""
    return ImageFont.load_default(size=max(MIN_FONT_SIZE, round(cell_width * FONT_SIZE_PER_CELL_WIDTH)))


def image_grid(images: torch.Tensor, captions: list[str], columns: int, title: str | None = None,
               row_labels: list[str] | None = None) -> Image.Image:
    """Images [N, 3, H, W] in [0, 1] laid out ``columns`` wide, each with its caption underneath.

    ``title`` goes above the grid; ``row_labels`` (one per row, e.g. checkpoint names) go in a column on the left.
    """
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    cells = [to_pil(image) for image in images]
    rows = -(-len(cells) // columns)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{rows} rows but {len(row_labels)} row labels")
    scale = max(1, -(-MIN_CELL // max(cells[0].size)))
    width, height = cells[0].width * scale, cells[0].height * scale
    font = label_font(width)
    line_height = round(font.size * 1.25)
    caption_lines = [_wrap(text, font, width - 6)[:4] or [""] for text in captions]
    caption_height = line_height * max(len(lines) for lines in caption_lines) + 6
    # Wide enough for the longest label on one line, between half a cell and a cell.
    label_width = min(width, max(width // 2, 8 + round(max(map(font.getlength, row_labels))))) if row_labels else 0
    title_lines = _wrap(title, font, columns * width + label_width - 8) if title else []
    title_height = line_height * len(title_lines) + (8 if title else 0)
    grid = Image.new("RGB", (label_width + columns * width, title_height + rows * (height + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for line_number, line in enumerate(title_lines):
        draw.text((4, 4 + line_height * line_number), line, fill="black", font=font)
    for row, label in enumerate(row_labels or []):
        y = title_height + row * (height + caption_height)
        for line_number, line in enumerate(_wrap(label, font, label_width - 6)[:6]):
            draw.text((3, y + 3 + line_height * line_number), line, fill="black", font=font)
    for index, (cell, lines) in enumerate(zip(cells, caption_lines)):
        x, y = label_width + (index % columns) * width, title_height + (index // columns) * (height + caption_height)
        grid.paste(cell.resize((width, height), Image.NEAREST), (x, y))
        for line_number, line in enumerate(lines):
            draw.text((x + 3, y + height + 3 + line_height * line_number), line, fill="black", font=font)
    return grid


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Lines of ``text`` that fit ``width`` pixels in ``font``, broken at spaces (explicit newlines are kept); a word
    wider than ``width`` gets a line of its own."""
    lines = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return lines


def save_image_atomic(image: Image.Image, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
