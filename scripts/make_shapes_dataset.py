"""Write a (prompt, image) dataset of ShapesWorld data images: the preference trainers' CPU demo data.

    python3 scripts/make_shapes_dataset.py                      # assets/datasets/shapes: 18 prompts x 16 images
    python3 scripts/make_shapes_dataset.py --prompts FILE --per-prompt 4 --output DIR --seed 0

The images are rendered by diffrl.shapesworld (nothing is downloaded), as PNGs with a metadata.jsonl in the Hugging
Face imagefolder layout ({"file_name": ..., "text": ...}), which diffrl.image_data reads. Same arguments, same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from PIL import Image  # noqa: E402

from diffrl.shapesworld import samples_for_prompt  # noqa: E402


def write_dataset(prompts: list[str], per_prompt: int, output: Path, seed: int, resolution: int) -> int:
    """Render ``per_prompt`` images of each prompt into ``output``; returns the number of images."""
    output.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, prompt in enumerate(prompts):
        batch = samples_for_prompt(prompt, per_prompt, seed=seed, resolution=resolution)
        pixels = (batch.images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        for sample, array in enumerate(pixels):
            name = f"{index:03d}-{sample:03d}.png"
            Image.fromarray(array).save(output / name, optimize=True)
            lines.append(json.dumps({"file_name": name, "text": prompt}))
    (output / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=Path, default=REPO_ROOT / "assets" / "prompts" / "shapes-single-train.txt")
    parser.add_argument("--per-prompt", type=int, default=16)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "assets" / "datasets" / "shapes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args(argv)
    prompts = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    count = write_dataset(prompts, args.per_prompt, args.output, args.seed, args.resolution)
    print(f"wrote {count} images and metadata.jsonl to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
