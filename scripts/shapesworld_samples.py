"""Render a sheet of ShapesWorld examples, one row per prompt family, to a PNG (for humans to look at).

    python scripts/shapesworld_samples.py --output shapesworld.png --resolution 64 --per-family 8 --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from diffrl.shapesworld import FAMILIES, sample_batch

CAPTION = 12   # pixels per caption line under each image


def sheet(resolution: int, per_family: int, seed: int, scale: int) -> Image.Image:
    """A grid: rows = families, columns = samples, each image enlarged `scale` times with its prompt beneath."""
    cell_w, cell_h = resolution * scale, resolution * scale + 2 * CAPTION
    canvas = Image.new("RGB", (cell_w * per_family, cell_h * len(FAMILIES)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, family in enumerate(FAMILIES):
        batch = sample_batch(family, per_family, seed, resolution)
        pixels = (batch.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        for col, (image, prompt) in enumerate(zip(pixels, batch.prompts)):
            tile = Image.fromarray(image).resize((cell_w, cell_w), Image.NEAREST)
            canvas.paste(tile, (col * cell_w, row * cell_h))
            words = prompt.split(" ")
            half = (len(words) + 1) // 2   # two short lines fit under a 64 px tile
            for line, text in enumerate([" ".join(words[:half]), " ".join(words[half:])]):
                draw.text((col * cell_w + 2, row * cell_h + cell_w + line * CAPTION), text, fill="black")
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="shapesworld.png")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--per-family", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=2, help="enlargement of each image on the sheet")
    args = parser.parse_args()
    sheet(args.resolution, args.per_family, args.seed, args.scale).save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
