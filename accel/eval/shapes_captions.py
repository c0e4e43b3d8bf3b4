"""The caption grammar of the coloured-shapes scenes that shapes-flux was trained on and is scored by.

Captions mention one or two shapes::

    a {color} {shape} {position}
    a {color} {shape} {position} and a {color} {shape} {position}

`accel bench` scores prompts of this grammar for adherence (`accel.eval.shapes_scorer`); the scenes themselves are
drawn by the training data generator (`tools/refmodel/data.py`). Some (color, shape, position) triples
(``HELDOUT_TRIPLES``) never appear in the training split, so a trained model can be tested on compositions it has
not seen.

The base grammar (``COLORS``, ``SHAPES``, ``ALL_TRIPLES``, ``parse_caption``) is what the base model was trained on
and is unchanged. LoRA adapters teach words outside it: ``EXTRA_SHAPES`` (``star``, the built-in ``star`` adapter of
shapes-flux). ``parse_caption(..., extended=True)`` (which the scorer uses) also accepts them; ``STAR_TRIPLES`` are the
single-shape captions with the new word, of which ``STAR_HELDOUT_TRIPLES`` never appear in the adapter's training.
(Only single-shape captions: the T5 tokenizer spells ``star`` in 5 character tokens, so a two-shape caption with it
is longer than the model's 16 text tokens.)
"""

from __future__ import annotations

import itertools
import re
from typing import Sequence

__all__ = [
    "ALL_SHAPES",
    "ALL_TRIPLES",
    "COLORS",
    "EXTRA_SHAPES",
    "STAR_HELDOUT_TRIPLES",
    "STAR_TRAIN_TRIPLES",
    "STAR_TRIPLES",
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

# Words outside the base grammar, taught by LoRA adapters (the base model has never seen them).
EXTRA_SHAPES: tuple[str, ...] = ("star",)
ALL_SHAPES: tuple[str, ...] = (*SHAPES, *EXTRA_SHAPES)
STAR_TRIPLES: tuple[Triple, ...] = tuple(itertools.product(COLORS, ("star",), POSITIONS))
# 5 of the 20 star triples, one per position, every colour at least once: the adapter never sees them
STAR_HELDOUT_TRIPLES: tuple[Triple, ...] = (
    ("red", "star", "at the top"),
    ("green", "star", "on the left"),
    ("blue", "star", "at the bottom"),
    ("yellow", "star", "in the center"),
    ("green", "star", "on the right"),
)
STAR_TRAIN_TRIPLES: tuple[Triple, ...] = tuple(t for t in STAR_TRIPLES if t not in STAR_HELDOUT_TRIPLES)


def _caption_re(shapes: Sequence[str]) -> re.Pattern:
    part = rf"a ({'|'.join(COLORS)}) ({'|'.join(shapes)}) ({'|'.join(POSITIONS)})"
    return re.compile(rf"{part}(?: and {part})?")


_CAPTION_RE = _caption_re(SHAPES)
_EXTENDED_RE = _caption_re(ALL_SHAPES)


def make_caption(triples: Sequence[Triple], *, extended: bool = False) -> str:
    """Caption for one or two (color, shape, position) triples (``extended``: words of adapters allowed)."""
    if not 1 <= len(triples) <= 2:
        raise ValueError(f"captions mention one or two shapes, got {len(triples)}")
    for t in triples:
        check_triple(t, extended=extended)
    return " and ".join(f"a {c} {s} {p}" for c, s, p in triples)


def parse_caption(caption: str, *, extended: bool = False) -> list[Triple]:
    """Inverse of :func:`make_caption`.

    Case, surrounding/duplicate whitespace and one trailing full stop are
    tolerated (prompts typed by hand); anything else outside the grammar
    raises ValueError.  The grammar does not forbid two shapes at the same
    position -- the dataset never produces that, but the scorer can still
    judge such a prompt. ``extended`` also accepts the adapters' words (``EXTRA_SHAPES``).
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string, got {type(caption).__name__}")
    text = " ".join(caption.lower().split()).removesuffix(".").rstrip()
    m = (_EXTENDED_RE if extended else _CAPTION_RE).fullmatch(text)
    if m is None:
        raise ValueError(f"caption outside the shapes grammar: {caption!r}")
    g = m.groups()
    parts = [tuple(g[0:3])]
    if g[3] is not None:
        parts.append(tuple(g[3:6]))
    return parts  # type: ignore[return-value]


def check_triple(t: Triple, *, extended: bool = False) -> None:
    """ValueError unless `t` is a (color, shape, position) of the grammar (``extended``: adapters' words too)."""
    c, s, p = t
    if c not in COLORS or s not in (ALL_SHAPES if extended else SHAPES) or p not in POSITIONS:
        raise ValueError(f"unknown (color, shape, position): {t!r}")
