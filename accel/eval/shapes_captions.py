"""The caption grammar of the coloured-shapes scenes that shapes-flux was trained on and is scored by.

Captions mention one or two shapes::

    a {color} {shape} {position}
    a {color} {shape} {position} and a {color} {shape} {position}

`accel bench` scores prompts of this grammar for adherence (`accel.eval.shapes_scorer`); the scenes themselves are
drawn by the training data generator (`tools/refmodel/data.py`). Some (color, shape, position) triples
(``HELDOUT_TRIPLES``) never appear in the training split, so a trained model can be tested on compositions it has
not seen.
"""

from __future__ import annotations

import itertools
import re
from typing import Sequence

__all__ = [
    "ALL_TRIPLES",
    "COLORS",
    "HELDOUT_TRIPLES",
    "POSITIONS",
    "SHAPES",
    "TRAIN_TRIPLES",
    "Triple",
    "check_triple",
    "make_caption",
    "parse_caption",
]

# Saturated colours with well separated hues (red 0 deg, yellow ~52, green
# ~128, blue ~228) so a hue test tells them apart even after colour drift.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (25, 170, 45),
    "blue": (30, 70, 225),
    "yellow": (245, 215, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("on the left", "on the right", "at the top", "at the bottom", "in the center")

Triple = tuple[str, str, str]  # (color, shape, position)

ALL_TRIPLES: tuple[Triple, ...] = tuple(itertools.product(COLORS, SHAPES, POSITIONS))

# 9 of the 60 triples (15%), hand-picked so that each is a *new composition*
# of familiar parts: every colour (2-3x), shape (3x) and position (1-2x) is
# held out only a few times, and no (colour, shape), (colour, position) or
# (shape, position) pair is held out twice -- so each pair of attributes in a
# held-out triple is still seen together in training.
HELDOUT_TRIPLES: tuple[Triple, ...] = (
    ("red", "circle", "on the left"),
    ("green", "circle", "at the top"),
    ("blue", "circle", "in the center"),
    ("green", "square", "on the right"),
    ("blue", "square", "at the bottom"),
    ("yellow", "square", "at the top"),
    ("blue", "triangle", "on the left"),
    ("red", "triangle", "on the right"),
    ("yellow", "triangle", "at the bottom"),
)
TRAIN_TRIPLES: tuple[Triple, ...] = tuple(t for t in ALL_TRIPLES if t not in HELDOUT_TRIPLES)

_WORD = {"colors": "|".join(COLORS), "shapes": "|".join(SHAPES), "positions": "|".join(POSITIONS)}
_PART_RE = rf"a ({_WORD['colors']}) ({_WORD['shapes']}) ({_WORD['positions']})"
_CAPTION_RE = re.compile(rf"{_PART_RE}(?: and {_PART_RE})?")


def make_caption(triples: Sequence[Triple]) -> str:
    """Caption for one or two (color, shape, position) triples."""
    if not 1 <= len(triples) <= 2:
        raise ValueError(f"captions mention one or two shapes, got {len(triples)}")
    for t in triples:
        check_triple(t)
    return " and ".join(f"a {c} {s} {p}" for c, s, p in triples)


def parse_caption(caption: str) -> list[Triple]:
    """Inverse of :func:`make_caption`.

    Case, surrounding/duplicate whitespace and one trailing full stop are
    tolerated (prompts typed by hand); anything else outside the grammar
    raises ValueError.  The grammar does not forbid two shapes at the same
    position -- the dataset never produces that, but the scorer can still
    judge such a prompt.
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string, got {type(caption).__name__}")
    text = " ".join(caption.lower().split()).removesuffix(".").rstrip()
    m = _CAPTION_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"caption outside the shapes grammar: {caption!r}")
    g = m.groups()
    parts = [tuple(g[0:3])]
    if g[3] is not None:
        parts.append(tuple(g[3:6]))
    return parts  # type: ignore[return-value]


def check_triple(t: Triple) -> None:
    """ValueError unless `t` is a (color, shape, position) of the grammar."""
    c, s, p = t
    if c not in COLORS or s not in SHAPES or p not in POSITIONS:
        raise ValueError(f"unknown (color, shape, position): {t!r}")
