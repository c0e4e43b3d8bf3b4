"""Procedural "coloured shapes" images: the training data of shapes-flux.

Scenes are one or two axis-aligned shapes on a white background, captioned in the grammar of
``accel.eval.shapes_captions`` (which ``accel bench`` also uses to score adherence with
``accel.eval.shapes_scorer``). This renderer and dataset are training tooling, not part of the library.

Geometry is resolution independent: ``cx``, ``cy`` (shape centre, which is the
centre of its bounding box) and ``radius`` (half the side of its bounding
box) are fractions of the image side, with y pointing down.  Every shape
fills the square box ``[cx - r, cx + r] x [cy - r, cy + r]``: a circle of
radius ``r``, a square of side ``2r``, or an upward triangle with base ``2r``
and height ``2r``.

Training scenes use ``TRAIN_TRIPLES`` only; ``heldout_scenes`` build evaluation scenes on ``HELDOUT_TRIPLES``.

The ``star`` adapter's data (``tools/refmodel/train_lora.py``): ``ShapesDataset("star")`` draws single-shape scenes
of ``STAR_TRAIN_TRIPLES`` (a five-pointed star filling the same square box as the other shapes, but only the larger
boxes, ``STAR_RADIUS_RANGE``: smaller stars do not survive the frozen VAE), and
``star_scenes("heldout")`` the ``STAR_HELDOUT_TRIPLES``. The base splits are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import math

import numpy as np
from PIL import Image, ImageDraw

from accel.eval.shapes_captions import (
    ALL_TRIPLES,
    COLORS,
    HELDOUT_TRIPLES,
    STAR_HELDOUT_TRIPLES,
    STAR_TRAIN_TRIPLES,
    TRAIN_TRIPLES,
    Triple,
    check_triple,
    make_caption,
)

__all__ = [
    "BACKGROUND",
    "POSITION_REGIONS",
    "RADIUS_RANGE",
    "STAR_RADIUS_RANGE",
    "ShapeSpec",
    "Scene",
    "render",
    "sample_scene",
    "scene_from_triples",
    "heldout_scenes",
    "heldout_captions",
    "star_points",
    "star_scenes",
    "star_captions",
    "ShapesDataset",
]

BACKGROUND = (255, 255, 255)

# Where a shape's centre is drawn, as (x range, y range) in fractions of the
# side.  Side regions stay near the middle of the other axis, so positions are
# unambiguous: |offset from the centre| >= 0.20 on the named axis and <= 0.12 on
# the other one; "in the center" is within 0.08 on both.  Ranges are further
# clipped so that the whole shape stays inside the canvas (``_MARGIN``).
POSITION_REGIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "on the left": ((0.0, 0.30), (0.38, 0.62)),
    "on the right": ((0.70, 1.0), (0.38, 0.62)),
    "at the top": ((0.38, 0.62), (0.0, 0.30)),
    "at the bottom": ((0.38, 0.62), (0.70, 1.0)),
    "in the center": ((0.42, 0.58), (0.42, 0.58)),
}
STAR_INNER = 0.45  # inner / outer radius of the star (a regular pentagram has 0.38: chunkier survives blur)
RADIUS_RANGE = (0.12, 0.22)  # half bounding-box side, fraction of the image side
# Stars are drawn big: the frozen VAE (8x8 latents for 128 px) keeps a star's five points only from this radius on;
# a smaller star encodes and decodes as a rounded pentagon (radius 0.15: 0 of 64 round trips still score as stars,
# 0.17: 75%, 0.19: 98%), which the adapter would learn to draw and the scorer rightly calls a circle or triangle.
STAR_RADIUS_RANGE = (0.19, 0.22)
_MARGIN = 0.02  # min distance of a shape's box from the canvas edge
_GAP = 0.06  # min gap between the boxes of two shapes (keeps blobs separate)
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: its words plus its geometry (fractions of the image side)."""

    color: str
    shape: str
    position: str
    cx: float
    cy: float
    radius: float

    @property
    def triple(self) -> Triple:
        return (self.color, self.shape, self.position)

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the shape's bounding box."""
        return (self.cx - self.radius, self.cy - self.radius, self.cx + self.radius, self.cy + self.radius)


@dataclass(frozen=True)
class Scene:
    """A structured scene; ``caption`` is derived from the shapes, in order."""

    shapes: tuple[ShapeSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(self.shapes))

    @property
    def caption(self) -> str:
        return make_caption([s.triple for s in self.shapes], extended=True)

    @property
    def triples(self) -> list[Triple]:
        return [s.triple for s in self.shapes]


# ---------------------------------------------------------------- rendering


def render(scene: Scene, size: int = 128) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image.

    Shapes are drawn at 4x and box-filtered down: exact area coverage gives
    clean anti-aliased edges whose pixels are blends of the shape colour and
    white only (no ringing halos of other hues for a model to learn).
    """
    if size < 16:
        raise ValueError("size must be >= 16")
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        x0, y0, x1, y1 = (v * big for v in s.box)
        fill = COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif s.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        elif s.shape == "star":
            draw.polygon(star_points((x0, y0, x1, y1)), fill=fill)
        else:
            raise ValueError(f"unknown shape {s.shape!r}")
    return img.reduce(_SUPERSAMPLE)


def star_points(box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """The 10 vertices of an upward five-pointed star whose bounding box is ``box``'s width, centred in ``box``
    (it is 0.95 of the box high: a star is wider than high)."""
    x0, y0, x1, y1 = box
    outer = (x1 - x0) / 2 / math.cos(math.radians(18))  # the side points touch the box's sides
    cx = (x0 + x1) / 2
    cy = (y0 + y1) / 2 + outer * (1 - math.cos(math.radians(36))) / 2  # the star's own box centred on box's
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else outer * STAR_INNER
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


# ----------------------------------------------------------------- sampling


def _sample_geometry(rng: np.random.Generator, positions: Sequence[str], max_tries: int = 1000,
                     radius_ranges: Sequence[tuple[float, float]] | None = None):
    """Centres and radii for shapes at ``positions`` (radius uniform in ``radius_ranges[i]``, default
    ``RADIUS_RANGE``), boxes apart by ``_GAP``.

    Rejection sampling; with two shapes, pairs such as left+center only fit
    with smaller radii, so those scenes are biased towards small shapes.
    """
    for _ in range(max_tries):
        geo = []
        for i, pos in enumerate(positions):
            r = rng.uniform(*(radius_ranges[i] if radius_ranges else RADIUS_RANGE))
            (xlo, xhi), (ylo, yhi) = POSITION_REGIONS[pos]
            lo, hi = r + _MARGIN, 1.0 - r - _MARGIN
            xlo, xhi, ylo, yhi = max(xlo, lo), min(xhi, hi), max(ylo, lo), min(yhi, hi)
            geo.append((rng.uniform(xlo, xhi), rng.uniform(ylo, yhi), r))
        if len(geo) < 2 or _boxes_apart(geo[0], geo[1]):
            return geo
    raise RuntimeError(f"could not place shapes at {positions}")


def _boxes_apart(a, b) -> bool:
    (ax, ay, ar), (bx, by, br) = a, b
    return abs(ax - bx) >= ar + br + _GAP or abs(ay - by) >= ar + br + _GAP


def scene_from_triples(rng: np.random.Generator, triples: Sequence[Triple]) -> Scene:
    """A scene showing exactly ``triples`` (positions must differ), random geometry."""
    if not 1 <= len(triples) <= 2:
        raise ValueError("a scene has one or two shapes")
    for t in triples:
        check_triple(t, extended=True)
    positions = [t[2] for t in triples]
    if len(set(positions)) != len(positions):
        raise ValueError(f"shapes must be at different positions: {triples!r}")
    geo = _sample_geometry(rng, positions, radius_ranges=[STAR_RADIUS_RANGE if t[1] == "star" else RADIUS_RANGE
                                                          for t in triples])
    return Scene(tuple(ShapeSpec(c, s, p, float(x), float(y), float(r)) for (c, s, p), (x, y, r) in zip(triples, geo)))


def sample_scene(
    rng: np.random.Generator, *, num_shapes: int, allowed: Iterable[Triple] | None = None
) -> Scene:
    """A random scene of ``num_shapes`` (1 or 2) shapes drawn from ``allowed`` triples.

    Each triple is uniform over ``allowed`` (default: all 60); the second one is
    re-drawn among those at a different position.
    """
    pool = list(ALL_TRIPLES if allowed is None else allowed)
    if not pool:
        raise ValueError("no allowed triples")
    first = pool[rng.integers(len(pool))]
    triples = [first]
    if num_shapes == 2:
        rest = [t for t in pool if t[2] != first[2]]
        if not rest:
            raise ValueError("allowed triples need two different positions for two-shape scenes")
        triples.append(rest[rng.integers(len(rest))])
    elif num_shapes != 1:
        raise ValueError("num_shapes must be 1 or 2")
    return scene_from_triples(rng, triples)


def _heldout_scene(rng: np.random.Generator, num_shapes: int, first: Triple | None = None) -> Scene:
    """A scene with at least one held-out triple, in random order."""
    if first is None:
        first = HELDOUT_TRIPLES[rng.integers(len(HELDOUT_TRIPLES))]
    triples = [first]
    if num_shapes == 2:
        rest = [t for t in ALL_TRIPLES if t[2] != first[2]]
        triples.append(rest[rng.integers(len(rest))])
        if rng.random() < 0.5:
            triples.reverse()
    return scene_from_triples(rng, triples)


def heldout_scenes(kind: str = "single", n: int = len(HELDOUT_TRIPLES), seed: int = 0) -> list[Scene]:
    """Evaluation scenes built on ``HELDOUT_TRIPLES``.

    ``kind="single"``: one held-out shape; the 9 triples are cycled in a
    shuffled order, so every n >= 9 covers each of them evenly.
    ``kind="double"``: one held-out shape plus any other shape at another
    position (which may itself be held out), in random order.
    """
    if kind not in ("single", "double"):
        raise ValueError("kind must be 'single' or 'double'")
    rng = np.random.default_rng([seed, 7, 1 if kind == "single" else 2])
    scenes = []
    order: list[int] = []
    for _ in range(n):
        if not order:
            order = list(rng.permutation(len(HELDOUT_TRIPLES)))
        first = HELDOUT_TRIPLES[order.pop()]
        scenes.append(_heldout_scene(rng, 1 if kind == "single" else 2, first))
    return scenes


def heldout_captions(kind: str = "single", n: int = len(HELDOUT_TRIPLES), seed: int = 0) -> list[str]:
    """Captions of :func:`heldout_scenes` (render those for reference images)."""
    return [s.caption for s in heldout_scenes(kind, n, seed)]


def star_scenes(kind: str = "heldout", n: int = len(STAR_HELDOUT_TRIPLES), seed: int = 0) -> list[Scene]:
    """Single-star scenes for the ``star`` adapter: ``kind="heldout"`` cycles ``STAR_HELDOUT_TRIPLES`` (never in
    the adapter's training), ``kind="train"`` ``STAR_TRAIN_TRIPLES``, each in a shuffled order."""
    triples = {"heldout": STAR_HELDOUT_TRIPLES, "train": STAR_TRAIN_TRIPLES}.get(kind)
    if triples is None:
        raise ValueError("kind must be 'heldout' or 'train'")
    rng = np.random.default_rng([seed, 7, 3 if kind == "heldout" else 4])
    scenes, order = [], []
    for _ in range(n):
        if not order:
            order = list(rng.permutation(len(triples)))
        scenes.append(scene_from_triples(rng, [triples[order.pop()]]))
    return scenes


def star_captions(kind: str = "heldout", n: int = len(STAR_HELDOUT_TRIPLES), seed: int = 0) -> list[str]:
    """Captions of :func:`star_scenes`."""
    return [s.caption for s in star_scenes(kind, n, seed)]


# ------------------------------------------------------------------ dataset

_SPLIT_CODES = {"train": 0, "heldout": 1, "star": 2}


class ShapesDataset:
    """Deterministic, generated-on-the-fly dataset of (image, caption) pairs.

    ``ds[i]`` returns ``(np.ndarray uint8 of shape (size, size, 3), caption)``;
    it depends only on (split, seed, i, size, two_shape_fraction), so the same
    index always gives identical bytes, in any process or order.

    ``split="train"``: every shape is a ``TRAIN_TRIPLES`` triple.
    ``split="heldout"``: at least one shape is a ``HELDOUT_TRIPLES`` triple (for
    evaluation only). ``split="star"``: one star of ``STAR_TRAIN_TRIPLES`` (the
    ``star`` adapter's new data; ``two_shape_fraction`` does not apply).  ``length`` is nominal (defaults 100_000 / 2_000): any
    index >= 0 produces a valid sample, so larger datasets are just a bigger
    ``length``.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 128,
        seed: int = 0,
        two_shape_fraction: float = 0.5,
        length: int | None = None,
    ) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}")
        if not 0.0 <= two_shape_fraction <= 1.0:
            raise ValueError("two_shape_fraction must be in [0, 1]")
        self.split = split
        self.size = int(size)
        self.seed = int(seed)
        self.two_shape_fraction = float(two_shape_fraction)
        self.length = int(length if length is not None else (100_000 if split == "train" else 2_000))

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        """The structured scene behind ``self[index]``."""
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])
        if self.split == "star":
            return sample_scene(rng, num_shapes=1, allowed=STAR_TRAIN_TRIPLES)
        num_shapes = 2 if rng.random() < self.two_shape_fraction else 1
        if self.split == "train":
            return sample_scene(rng, num_shapes=num_shapes, allowed=TRAIN_TRIPLES)
        return _heldout_scene(rng, num_shapes)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        scene = self.scene(index)
        return np.asarray(render(scene, self.size), dtype=np.uint8), scene.caption

    def __iter__(self) -> Iterator[tuple[np.ndarray, str]]:
        for i in range(self.length):
            yield self[i]

    def captions(self, start: int = 0, stop: int | None = None) -> list[str]:
        """Captions of a range of indices, without rendering (cheap)."""
        stop = self.length if stop is None else stop
        return [self.scene(i).caption for i in range(start, stop)]
