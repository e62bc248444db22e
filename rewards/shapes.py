"""ShapesWorld rewards: read colours, shapes, counts and positions back from pixels and score them against the prompt.

Perception (shared by both rewards and by diffrl.shapesworld_statistics):
1. Background: the neutral palette colour (black/gray/white) nearest to the most pixels.
2. Unmixing: each pixel p is compared with every segment from the background b to an object colour c; its coverage
   α_c = clamp(<p−b, c−b>/|c−b|², 0, 1) is how much of colour c the pixel holds, d²_c its distance to the segment.
   This reads anti-aliased or blurred edges (mixtures of c and b) as partial c, never as a third colour.
3. Hard segmentation: a pixel is an object pixel of colour argmin_c d²_c when that colour's α ≥ 0.5.
4. Objects: 8-connected components of one colour with at least MIN_AREA of the image; shape from the nearest
   prototype of three features: box fill ratio (square 1, circle π/4, diamond and triangle 1/2), moment ratio
   μ22/(μ20·μ02) (square 1, circle 2/3, diamond 2/5, triangle 0.8) and the share of pixels in the box's lower half
   (triangle 3/4, the others 1/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffrl.shapesworld import BACKGROUNDS, COLOURS, SHAPES, PromptSpec, parse_prompt

OBJECT_RGB = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255           # [K, 3]
BACKGROUND_RGB = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32) / 255   # [3, 3]
COLOUR_NAMES = list(COLOURS)
MIN_AREA = 0.004   # image fraction; the smallest data object (a 0.16 triangle) covers 0.0128, edge debris far less
# (box fill ratio, moment ratio μ22/(μ20·μ02), lower-half share) of each ideal shape. Fill and moment ratio each
# separate circles from diamonds badly at 5 px (box and moments both distorted by pixelation), together well.
SHAPE_PROTOTYPES = {"circle": (math.pi / 4, 2 / 3, 0.5), "square": (1.0, 1.0, 0.5),
                    "triangle": (0.5, 0.8, 0.75), "diamond": (0.5, 0.4, 0.5)}
FEATURE_WEIGHTS = np.array([1.0, 1.0, 2.0])


@dataclass
class DetectedObject:
    """One object read from pixels; area is a fraction of the image, (x, y) the centroid in image fractions."""
    colour: str
    shape: str
    area: float
    x: float
    y: float
    mask: np.ndarray = field(repr=False)   # bool [H, W]

    @property
    def size(self) -> float:
        """Side of the square with the object's area, an image fraction: comparable to ShapeObject.size."""
        return math.sqrt(self.area)


@dataclass
class DetectedScene:
    background: str
    objects: list[DetectedObject]

    def of_colour(self, colour: str) -> list[DetectedObject]:
        return [obj for obj in self.objects if obj.colour == colour]


# ---------------------------------------------------------------- perception

def detect_backgrounds(images: Tensor) -> Tensor:
    """Index into BACKGROUNDS [B]: the background colour nearest to the most pixels (objects' pixels not counted)."""
    palette = torch.cat([BACKGROUND_RGB, OBJECT_RGB]).to(images)
    distances = ((images.detach()[:, None] - palette[None, :, :, None, None]) ** 2).sum(2)   # [B, 3+K, H, W]
    nearest = distances.argmin(1).flatten(1)
    counts = torch.stack([(nearest == i).sum(1) for i in range(len(BACKGROUND_RGB))], 1)
    return counts.argmax(1)


def unmix(images: Tensor, backgrounds: Tensor) -> tuple[Tensor, Tensor]:
    """Coverage α [B, K, H, W] of each object colour and squared distance d² [B, K, H, W] to the segment from the
    image's background to that colour (see the module docstring). Differentiable in `images`."""
    images = images.float()
    background = BACKGROUND_RGB.to(images)[backgrounds]                      # [B, 3]
    offset = images - background[:, :, None, None]                          # p − b
    direction = OBJECT_RGB.to(images)[None] - background[:, None]           # c − b   [B, K, 3]
    dot = torch.einsum("bchw,bkc->bkhw", offset, direction)
    length2 = (direction ** 2).sum(-1)[:, :, None, None]
    coverage = (dot / length2).clamp(0, 1)
    distance2 = (offset ** 2).sum(1, keepdim=True) - 2 * coverage * dot + coverage ** 2 * length2
    return coverage, distance2.clamp_min(0)


def segment(images: Tensor) -> tuple[Tensor, Tensor]:
    """Hard colour map [B, H, W] (index into COLOURS, −1 for background) and background indices [B]."""
    backgrounds = detect_backgrounds(images)
    coverage, distance2 = unmix(images.detach(), backgrounds)
    colour = distance2.argmin(1)
    covered = coverage.gather(1, colour[:, None])[:, 0] >= 0.5
    return torch.where(covered, colour, -1), backgrounds


def label_components(colour_map: Tensor) -> Tensor:
    """8-connected components of equal colour: labels [B, H, W], 0 for background, ids unique per image.
    Each pixel takes the largest label among its same-colour neighbours, then jumps to the label that pixel holds
    (pointer jumping, so long objects need O(log length) rounds), until nothing changes."""
    b, h, w = colour_map.shape
    planes = F.one_hot(colour_map + 1, len(COLOURS) + 1)[..., 1:].permute(0, 3, 1, 2).float()   # [B, K, H, W]
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w) * planes
    while True:
        grown = (F.max_pool2d(labels, 3, stride=1, padding=1) * planes).sum(1).flatten(1)    # [B, H*W]
        jumped = torch.maximum(grown, grown.gather(1, (grown.long() - 1).clamp_min(0)) * (grown > 0))
        jumped = jumped.view(b, 1, h, w) * planes
        if torch.equal(jumped, labels):
            return labels.sum(1).long()
        labels = jumped


def detect(images: Tensor) -> list[DetectedScene]:
    """The objects (colour, shape, area, centroid, mask) and background of each image [B, 3, H, W] in [0, 1]."""
    colour_map, backgrounds = segment(images)
    labels = label_components(colour_map).numpy()
    colour_map = colour_map.numpy()
    return [DetectedScene(list(BACKGROUNDS)[int(bg)], _objects(labels[i], colour_map[i]))
            for i, bg in enumerate(backgrounds)]


def _objects(labels: np.ndarray, colour_map: np.ndarray) -> list[DetectedObject]:
    h, w = labels.shape
    objects = []
    for label in np.unique(labels[labels > 0]):
        mask = labels == label
        rows, cols = np.nonzero(mask)
        if len(rows) < MIN_AREA * h * w:
            continue
        colour = COLOUR_NAMES[colour_map[rows[0], cols[0]]]
        objects.append(DetectedObject(colour, classify_shape(rows, cols), len(rows) / (h * w),
                                      (cols.mean() + 0.5) / w, (rows.mean() + 0.5) / h, mask))
    return objects


def shape_features(rows: np.ndarray, cols: np.ndarray) -> tuple[float, float, float]:
    """(box fill ratio, moment ratio μ22/(μ20·μ02), lower-half share) of an object's pixels; see SHAPE_PROTOTYPES."""
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    fill = len(rows) / ((bottom - top) * (right - left))
    y, x = rows - rows.mean(), cols - cols.mean()
    ratio = (x * x * y * y).mean() / max((x * x).mean() * (y * y).mean(), 1e-12)
    middle = (top + bottom) / 2
    lower = ((rows + 0.5 > middle).sum() + 0.5 * (rows + 0.5 == middle).sum()) / len(rows)
    return fill, ratio, lower


def classify_shape(rows: np.ndarray, cols: np.ndarray) -> str:
    """The shape whose prototype features are nearest; the lower-half share counts double because it alone
    separates triangles from diamonds."""
    features = np.array(shape_features(rows, cols))
    return min(SHAPES, key=lambda s: (((features - SHAPE_PROTOTYPES[s]) * FEATURE_WEIGHTS) ** 2).sum())


# ---------------------------------------------------------------- exact checks

FACTORS = ("colour", "shape", "count", "relation")


def check(spec: PromptSpec, scene: DetectedScene) -> dict[str, bool]:
    """Which of the prompt's factors the detected scene satisfies ("relation" only for relation prompts), and "all".
    colour: every named colour is present.  shape: every object of a named colour has that group's shape.
    count: exactly the named number of objects of each named colour, and no object of another colour.
    relation: the centroids of the two named objects (the largest of each colour) are in the named order."""
    named = {group.colour for group in spec.groups}
    result = {
        "colour": all(scene.of_colour(g.colour) for g in spec.groups),
        "shape": all(scene.of_colour(g.colour) and all(o.shape == g.shape for o in scene.of_colour(g.colour))
                     for g in spec.groups),
        "count": all(len(scene.of_colour(g.colour)) == g.count for g in spec.groups)
                 and all(o.colour in named for o in scene.objects),
    }
    if spec.relation:
        result["relation"] = _relation_seen(spec, scene)
    result["all"] = all(result.values())
    return result


def _relation_seen(spec: PromptSpec, scene: DetectedScene) -> bool:
    first, second = (scene.of_colour(g.colour) for g in spec.groups)
    if not first or not second:
        return False
    a, b = (max(objs, key=lambda o: o.area) for objs in (first, second))
    return {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[spec.relation]


class ShapesAccuracyReward(nn.Module):
    """ShapesWorld prompt match read from pixels: the fraction of the prompt's checks (colour, shape, count, relation) an image passes; exact, not differentiable.

    1.0 means the image matches the prompt entirely (see `check` for each factor). A prompt outside the ShapesWorld
    grammar scores 0. Blind spots: shapes are told apart only by box fill ratio and lower-half share, so any blob
    with a square's fill passes as a square, and a rotated triangle may read as a diamond; objects smaller than
    MIN_AREA (0.4% of the image) are ignored; touching objects of one colour count as one; "left of" compares
    centroids only (1 px suffices); colours far from the palette are forced to the nearest palette colour.
    """

    differentiable = False

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        scenes = detect(images.detach().float().cpu().clamp(0, 1))
        scores = []
        for prompt, scene in zip(prompts, scenes):
            spec = parse_prompt(prompt)
            if spec is None:
                scores.append(0.0)
                continue
            passed = check(spec, scene)
            passed.pop("all")
            scores.append(sum(passed.values()) / len(passed))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


# ---------------------------------------------------------------- soft (differentiable) version

TEMPERATURE = 0.05       # softmax temperature over squared RGB distances to the colour segments ([0, 1] units)
PRESENCE_AREA = 0.004    # image fraction; presence = 1 − exp(−area / (count · this)), saturated by real objects
COUNT_WIDTH2 = 0.5       # count term exp(−squared count error / this)
RELATION_SCALE = 0.05    # image fractions; sigmoid of the centroid offset along the named axis over this
# (moment ratio μ22/(μ20·μ02), vertical skewness) of each ideal shape: the bbox-free features that have gradients.
SOFT_PROTOTYPES = torch.tensor([[2 / 3, 0.0], [1.0, 0.0], [0.8, -0.566], [0.4, 0.0]])   # SHAPES order
SOFT_SCALES = torch.tensor([0.1, 0.15])


def memberships(images: Tensor, backgrounds: Tensor) -> Tensor:
    """Soft colour maps [B, K, H, W]: coverage α_c times a softmax over colours of −d²_c / TEMPERATURE."""
    coverage, distance2 = unmix(images, backgrounds)
    return coverage * torch.softmax(-distance2 / TEMPERATURE, dim=1)


def soft_shape_probabilities(coverage: Tensor) -> Tensor:
    """Shape probabilities [N, len(SHAPES)] from moments of coverage maps [N, H, W] holding one object each."""
    n, h, w = coverage.shape
    ys = torch.arange(h, dtype=coverage.dtype).view(1, h, 1)
    xs = torch.arange(w, dtype=coverage.dtype).view(1, 1, w)
    mass = coverage.sum((1, 2)).clamp_min(1e-6)
    mean = lambda f: (coverage * f).sum((1, 2)) / mass
    y = ys - mean(ys.expand(n, h, w))[:, None, None]
    x = xs - mean(xs.expand(n, h, w))[:, None, None]
    m20, m02 = mean(x * x), mean(y * y)
    ratio = mean(x * x * y * y) / (m20 * m02).clamp_min(1e-6)
    skew = mean(y ** 3) / m02.clamp_min(1e-6) ** 1.5
    features = torch.stack([ratio, skew], 1)
    distance = (((features[:, None] - SOFT_PROTOTYPES.to(features)) / SOFT_SCALES.to(features)) ** 2).sum(-1)
    return torch.softmax(-distance, dim=1)


def soft_scores(images: Tensor, specs: list[PromptSpec | None]) -> Tensor:
    """Differentiable prompt match in [0, 1] per image; see ShapesAlignmentReward."""
    images = images.float()
    backgrounds = detect_backgrounds(images)
    member = memberships(images, backgrounds)                                    # [B, K, H, W]
    scenes = detect(images.detach().cpu().clamp(0, 1))                           # hard objects: where to look
    scores = [_soft_score(spec, member[i], scene) if spec else images.new_zeros(()) + 0 * member[i].sum()
              for i, (spec, scene) in enumerate(zip(specs, scenes))]
    return torch.stack(scores)


def _soft_score(spec: PromptSpec, member: Tensor, scene: DetectedScene) -> Tensor:
    k, h, w = member.shape
    colours = [COLOUR_NAMES.index(g.colour) for g in spec.groups]
    presence = torch.stack([1 - torch.exp(-member[c].mean() / (g.count * PRESENCE_AREA))
                            for c, g in zip(colours, spec.groups)]).mean()
    terms = [presence]
    if scene.objects:
        masks = torch.from_numpy(np.stack([o.mask for o in scene.objects])).to(member)       # [N, H, W]
        share = torch.einsum("khw,nhw->nk", member, masks) / masks.sum((1, 2))[:, None]  # mean membership
        counts = share[:, colours].sum(0)                                                # soft count per group
        extra = (1 - share[:, colours].sum(1)).clamp_min(0).sum()
        wanted = torch.tensor([float(g.count) for g in spec.groups]).to(member)
        terms.append(torch.exp(-(((counts - wanted) ** 2).sum() + extra ** 2) / COUNT_WIDTH2))
        near = F.max_pool2d(masks[:, None], 3, stride=1, padding=1)[:, 0]              # edges count softly
        shapes = soft_shape_probabilities(member.sum(0) * near)                         # [N, len(SHAPES)]
        fits = [(share[:, c] * shapes[:, SHAPES.index(g.shape)]).sum() / (share[:, c].sum() + 1e-6)
                for c, g in zip(colours, spec.groups)]
        terms.append(torch.stack(fits).mean())
    else:
        terms += [member.sum() * 0, member.sum() * 0]        # nothing to count or shape: both terms are 0
    if spec.relation:
        terms.append(_soft_relation(spec.relation, member[colours[0]], member[colours[1]]))
    return torch.stack(terms).mean()


def _soft_relation(relation: str, first: Tensor, second: Tensor) -> Tensor:
    h, w = first.shape
    def centroid(m):
        mass = m.sum().clamp_min(1e-6)
        ys, xs = torch.arange(h).to(m), torch.arange(w).to(m)
        return (m.sum(0) * xs).sum() / mass / w, (m.sum(1) * ys).sum() / mass / h
    (ax, ay), (bx, by) = centroid(first), centroid(second)
    along = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[relation]
    return torch.sigmoid(along / RELATION_SCALE)


class ShapesAlignmentReward(nn.Module):
    """ShapesWorld prompt match as a differentiable score in [0, 1]: soft colour presence, count, shape and relation.

    The mean of the prompt's terms, each in [0, 1]: colour (1 − exp(−soft area of each named colour / its count ×
    0.4% of the image): saturates once an object's worth of colour is there), count (exp(−(squared error of the soft
    count of each colour + soft count of objects of other colours) / 0.5); soft count = mean membership of a colour
    over each detected object), shape (per detected object, a softmax over distances of its moment ratio and
    vertical skewness to each shape's ideal, weighted by how much the object is of the named colour), relation
    (sigmoid of the soft colour centroids' offset along the named axis / 0.05). Soft memberships use the same
    unmixing as the exact scorer with a softmax of temperature 0.05 over colours. A prompt outside the grammar
    scores 0. Blind spots: where objects are is decided by the exact (detached) detector, so gradients recolour and
    reshape existing objects but cannot create a missing one beyond the colour-presence term; gradients through a
    far-off colour's softmax weight are tiny (a blue pixel's red weight is ~e^-20); the shape term tells circles
    from diamonds only by one moment ratio, so it is unreliable below ~8 px; the colour term can be raised by
    colour alone, whatever the shape; the relation uses centroids of all pixels of each colour.
    """

    differentiable = True

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return soft_scores(images, [parse_prompt(p) for p in prompts])
