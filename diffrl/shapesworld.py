"""ShapesWorld: a procedural world of coloured shapes on plain backgrounds, with prompts and ground truth.

A tiny text-to-image testbed where alignment is checkable from pixels (rewards/shapes.py reads scenes back). Every
sample is a function of (seed, family, index) alone, so any batch can be regenerated exactly, on any resolution:
geometry lives in image-fraction units and is rasterised at the end.

Prompt families, easiest first:
    single     "a red circle"
    pair       "a red circle and a blue square"           (attribute binding; the two colours differ)
    relation   "a red circle left of a blue square"       (left of / right of / above / below, by centroid)
    count      "three blue triangles"                     (1 to 4 objects of one colour and shape)
`sample_batch` gives float images [B, 3, H, W] in [0, 1], prompts and the scenes (ground-truth factors);
`parse_prompt` turns a prompt back into its PromptSpec (rewards receive only images and prompt strings).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

# Object colours, 0-255 RGB: saturated and far apart in RGB, so a pixel's colour is unambiguous.
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (150, 50, 200),
}
# Backgrounds are neutral, so no mixture of an object colour with the background looks like another object colour.
BACKGROUNDS = {"black": (20, 20, 20), "gray": (128, 128, 128), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "diamond")
RELATIONS = ("left of", "right of", "above", "below")
FAMILIES = ("single", "pair", "relation", "count")
MAX_COUNT = 4
NUMBER_WORDS = ("one", "two", "three", "four")

# Object size = side of its square bounding box, as a fraction of the image side. Count scenes hold up to four
# objects, so their objects are smaller; at 32 px the smallest is ~5 px, still classifiable.
SIZE_RANGE = {"single": (0.22, 0.40), "pair": (0.22, 0.40), "relation": (0.22, 0.40), "count": (0.16, 0.28)}
BORDER = 0.04          # free margin between any object and the image edge (image fractions)
GAP = 0.07             # free space between two objects' boxes: they never touch, so components separate them
RELATION_OFFSET = 0.1  # "left of" etc.: centroids at least this far apart along the named axis
SUPERSAMPLE = 4        # anti-aliasing: draw at 4x and box-filter down (deterministic, PIL only)


@dataclass(frozen=True)
class ObjectGroup:
    """`count` objects of one colour and shape, as a prompt names them."""
    colour: str
    shape: str
    count: int = 1


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: one or two object groups and, for two, optionally how the first sits to the second."""
    groups: tuple[ObjectGroup, ...]
    relation: str | None = None


@dataclass(frozen=True)
class ShapeObject:
    """One rendered object: box side `size` and centre (x, y), all image fractions; y grows downwards."""
    colour: str
    shape: str
    size: float
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    """Ground-truth factors of one image."""
    background: str
    objects: tuple[ShapeObject, ...]


@dataclass
class ShapesBatch:
    images: Tensor            # [B, 3, H, W] float32 in [0, 1]
    prompts: list[str]
    specs: list[PromptSpec]
    scenes: list[Scene]


# ---------------------------------------------------------------- prompts

def prompt_text(spec: PromptSpec) -> str:
    """The prompt for a spec: "a red circle", "three blue triangles", "a red circle left of a blue square"."""
    phrases = [_group_phrase(group) for group in spec.groups]
    joiner = f" {spec.relation} " if spec.relation else " and "
    return joiner.join(phrases)


def _group_phrase(group: ObjectGroup) -> str:
    if group.count == 1:
        article = "an" if group.colour[0] in "aeiou" else "a"
        return f"{article} {group.colour} {group.shape}"
    return f"{NUMBER_WORDS[group.count - 1]} {group.colour} {group.shape}s"


_GROUP = rf"(an?|{'|'.join(NUMBER_WORDS)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})(s?)"
_PROMPT = re.compile(rf"{_GROUP}(?: (and|{'|'.join(RELATIONS)}) {_GROUP})?")


def parse_prompt(prompt: str) -> PromptSpec | None:
    """The spec a ShapesWorld prompt asks for, or None if the prompt is outside the grammar.
    Case and surrounding whitespace/full stop are ignored; "a"/"an"/"one" take the singular, two-four the plural
    (the article is not checked against the colour)."""
    match = _PROMPT.fullmatch(prompt.strip().rstrip(".").lower())
    if match is None:
        return None
    first = _parse_group(*match.group(1, 2, 3, 4))
    if match.group(5) is None:
        return None if first is None else PromptSpec((first,))
    second = _parse_group(*match.group(6, 7, 8, 9))
    if first is None or second is None or first.count != 1 or second.count != 1 or first.colour == second.colour:
        return None
    return PromptSpec((first, second), None if match.group(5) == "and" else match.group(5))


def _parse_group(number: str, colour: str, shape: str, plural: str) -> ObjectGroup | None:
    count = 1 if number in ("a", "an") else NUMBER_WORDS.index(number) + 1
    if (count > 1) != bool(plural):
        return None
    return ObjectGroup(colour, shape, count)


# ---------------------------------------------------------------- sampling

def sample_spec(family: str, rng: np.random.Generator) -> PromptSpec:
    """A random prompt spec of one family."""
    colours = list(rng.permutation(list(COLOURS))[:2])
    shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=2)]
    if family == "single":
        return PromptSpec((ObjectGroup(colours[0], shapes[0]),))
    if family == "count":
        return PromptSpec((ObjectGroup(colours[0], shapes[0], int(rng.integers(1, MAX_COUNT + 1))),))
    groups = (ObjectGroup(colours[0], shapes[0]), ObjectGroup(colours[1], shapes[1]))
    if family == "pair":
        return PromptSpec(groups)
    if family == "relation":
        return PromptSpec(groups, RELATIONS[int(rng.integers(len(RELATIONS)))])
    raise ValueError(f"unknown ShapesWorld family {family!r}; valid families: {', '.join(FAMILIES)}")


def sample_scene(spec: PromptSpec, rng: np.random.Generator, family: str | None = None) -> Scene:
    """A random layout satisfying `spec`: sizes, non-touching positions, background. Rejection sampling; retries
    the whole layout when objects do not fit or the relation does not hold."""
    family = family or _family_of(spec)
    lo, hi = SIZE_RANGE[family]
    kinds = [(g.colour, g.shape) for g in spec.groups for _ in range(g.count)]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    while True:
        objects = _place(kinds, rng, lo, hi)
        if objects is not None and (spec.relation is None or _relation_holds(spec.relation, *objects)):
            return Scene(background, tuple(objects))


def _family_of(spec: PromptSpec) -> str:
    if len(spec.groups) == 2:
        return "relation" if spec.relation else "pair"
    return "single" if spec.groups[0].count == 1 else "count"


def _place(kinds, rng: np.random.Generator, lo: float, hi: float, tries: int = 50) -> list[ShapeObject] | None:
    objects: list[ShapeObject] = []
    for colour, shape in kinds:
        for _ in range(tries):
            size = float(rng.uniform(lo, hi))
            x, y = (float(v) for v in rng.uniform(BORDER + size / 2, 1 - BORDER - size / 2, size=2))
            candidate = ShapeObject(colour, shape, size, x, y)
            if all(_apart(candidate, other) for other in objects):
                objects.append(candidate)
                break
        else:
            return None
    return objects


def _apart(a: ShapeObject, b: ShapeObject) -> bool:
    reach = (a.size + b.size) / 2 + GAP
    return abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


def _relation_holds(relation: str, a: ShapeObject, b: ShapeObject) -> bool:
    """The named axis dominates (so "left of" never looks like "above") and the offset is clear."""
    dx, dy = b.x - a.x, b.y - a.y
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= RELATION_OFFSET and along > abs(across)


def sample_rng(seed: int, family: str, index: int) -> np.random.Generator:
    """The generator for one sample: a pure function of (seed, family, index)."""
    return np.random.default_rng([seed, FAMILIES.index(family), index])


def sample_one(family: str, seed: int, index: int) -> tuple[PromptSpec, Scene]:
    rng = sample_rng(seed, family, index)
    spec = sample_spec(family, rng)
    return spec, sample_scene(spec, rng, family)


# ---------------------------------------------------------------- rendering

def render(scene: Scene, resolution: int) -> np.ndarray:
    """The scene as uint8 [resolution, resolution, 3]; anti-aliased by supersampling."""
    side = resolution * SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj, side)
    return np.asarray(image.reduce(SUPERSAMPLE))


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, side: int) -> None:
    half = obj.size * side / 2
    x, y = obj.x * side, obj.y * side
    left, top, right, bottom = x - half, y - half, x + half, y + half
    colour = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=colour)
    elif obj.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=colour)
    elif obj.shape == "triangle":     # apex up, base along the bottom of the box
        draw.polygon([(x, top), (right, bottom), (left, bottom)], fill=colour)
    else:                             # diamond: a square standing on a corner, touching the box's edge midpoints
        draw.polygon([(x, top), (right, y), (x, bottom), (left, y)], fill=colour)


def to_tensor(arrays: list[np.ndarray]) -> Tensor:
    """uint8 images [H, W, 3] -> float32 [B, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)


# ---------------------------------------------------------------- batches

def sample_batch(family: str, batch_size: int, seed: int = 0, resolution: int = 64, start: int = 0) -> ShapesBatch:
    """Samples start .. start+batch_size-1 of one family ("mixed": families in turn, index % 4) for `seed`."""
    pairs = []
    for index in range(start, start + batch_size):
        name = FAMILIES[index % len(FAMILIES)] if family == "mixed" else family
        pairs.append(sample_one(name, seed, index))
    scenes = [scene for _, scene in pairs]
    return ShapesBatch(to_tensor([render(s, resolution) for s in scenes]),
                       [prompt_text(spec) for spec, _ in pairs], [spec for spec, _ in pairs], scenes)


def batches(family: str, batch_size: int, seed: int = 0, resolution: int = 64) -> Iterator[ShapesBatch]:
    """An endless stream of consecutive batches (for pretraining): batch k holds samples k*B .. (k+1)*B-1."""
    start = 0
    while True:
        yield sample_batch(family, batch_size, seed, resolution, start)
        start += batch_size


def samples_for_prompt(prompt: str, count: int, seed: int = 0, resolution: int = 64) -> ShapesBatch:
    """`count` data images of one prompt (random layouts and backgrounds): the data distribution a model's samples of
    that prompt are compared with. Raises ValueError for a prompt outside the grammar."""
    spec = parse_prompt(prompt)
    if spec is None:
        raise ValueError(f"{prompt!r} is not a ShapesWorld prompt (e.g. 'a red circle', 'two blue squares')")
    family = _family_of(spec)
    scenes = [sample_scene(spec, np.random.default_rng([seed, 1000 + index]), family) for index in range(count)]
    return ShapesBatch(to_tensor([render(s, resolution) for s in scenes]), [prompt] * count, [spec] * count, scenes)
