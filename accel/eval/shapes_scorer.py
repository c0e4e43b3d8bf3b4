"""Prompt-adherence scorer for the coloured-shapes dataset (no learned network).

Why: accelerator quality must be measured on what the prompt asks for, and a
CLIP-style scorer would add its own errors.  Shapes images are simple enough
to check exactly with classical image analysis:

1. Each pixel gets the nearest palette colour by hue, and a coverage estimate
   ``alpha = chroma / chroma of that palette colour`` (anti-aliased edges and
   soft edges are blends with white: same hue, less chroma).  Pixels with
   ``alpha >= 0.5`` are "coloured"; white/grey/black backgrounds and mild
   noise have little chroma and drop out (a 3x3 median on the coverage
   keeps noise from fraying the outlines).
2. Coloured pixels of any hue are grouped into connected blobs (holes
   filled), so a shape whose edges drift in hue stays one blob; its colour is
   the coverage-weighted majority vote.  Blobs smaller than
   ``min_area_frac`` of the image are noise specks and ignored.
3. Position: the centre of the blob's bounding box (which is also how the
   renderer places shapes), tested against tolerant regions (see
   :func:`classify_position`).
4. Shape: from the fill ratio of the bounding box (square ~1, circle ~pi/4,
   triangle ~1/2), the top/bottom area balance (an upward triangle has 1/4 of
   its area in the top half) and how full the box's corners are (square
   ~1, circle ~0.3), see :func:`classify_shape`.  A star (the word the
   ``star`` LoRA adapter teaches) is sparse and balanced: low fill, corners
   nearly empty, about half its area on top.
5. Caption parts are matched to blobs by the assignment that agrees most
   (colour first, then position, then shape), so two shapes of the same
   colour are told apart by position.  A separate "count" check requires the
   number of significant blobs to equal the number of shapes mentioned.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from accel.eval.shapes_captions import COLORS, parse_caption  # captions of the extended grammar (adapters' words)

__all__ = [
    "Blob",
    "PartResult",
    "AdherenceResult",
    "detect_blobs",
    "classify_position",
    "classify_shape",
    "score",
    "score_blobs",
    "score_many",
]

_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) of float RGB in [..., 3]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / c) % 6.0, np.where(mx == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    return (h * 60.0) % 360.0


_PALETTE_HUE = _hue(_PALETTE)
_PALETTE_CHROMA = _PALETTE.max(-1) - _PALETTE.min(-1)

ALPHA_THRESHOLD = 0.5  # coverage above which a pixel belongs to a shape
MIN_AREA_FRAC = 0.008  # blobs smaller than this fraction of the image are specks
CENTER_TOL = 0.14  # |offset from image centre| below this on both axes -> "in the center"
STAR_MAX_CORNERS = 0.22  # a sparse blob with emptier corners than this is a star


@dataclass
class Blob:
    """A significant coloured region; geometry in fractions of the image side."""

    color: str
    color_purity: float  # share of the blob's coverage voting for ``color``
    area_frac: float  # blob area / image area
    cx: float  # bounding-box centre
    cy: float
    width: float
    height: float
    fill: float  # area / bounding-box area
    top_share: float  # share of the area in the top half of the box
    corners: float  # mean filled share of the four corner cells of the box
    shape: str
    position: str


@dataclass
class PartResult:
    """How one shape mentioned in the caption is met by the image."""

    color: str
    shape: str
    position: str
    color_ok: bool = False  # a blob of this colour is matched to this part
    shape_ok: bool = False
    position_ok: bool = False
    found_color: str | None = None  # what the matched blob is (None: no blob left)
    found_shape: str | None = None
    found_position: str | None = None

    @property
    def ok(self) -> bool:
        return self.color_ok and self.shape_ok and self.position_ok


@dataclass
class AdherenceResult:
    """Per-part verdicts plus the count check; ``all_correct`` needs all of them."""

    caption: str
    parts: list[PartResult]
    count_ok: bool  # number of significant blobs == number of shapes mentioned
    n_expected: int
    n_found: int
    blobs: list[Blob] = field(default_factory=list)

    @property
    def all_correct(self) -> bool:
        return self.count_ok and all(p.ok for p in self.parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "caption": self.caption,
            "all_correct": self.all_correct,
            "parts": [{**asdict(p), "ok": p.ok} for p in self.parts],
            "count": {"ok": self.count_ok, "expected": self.n_expected, "found": self.n_found},
            "blobs": [asdict(b) for b in self.blobs],
        }


# ---------------------------------------------------------------- analysis


def _to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """float32 HxWx3 in [0, 255] from a PIL image or an array (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    else:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
        arr = arr[..., :3]
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.clip(arr, 0.0, 1.0) * 255.0
        arr = arr.astype(np.float32)
    return arr


def classify_position(cx: float, cy: float) -> str:
    """Position word for a shape centred at (cx, cy) (fractions, y down).

    The renderer puts side shapes >= 0.20 off centre along their axis and
    centred shapes within 0.08; the boundary (0.14) sits halfway, and side
    positions are decided by the dominant axis, so moderately misplaced shapes
    are still read the way a person would.
    """
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTER_TOL:
        return "in the center"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def classify_shape(fill: float, top_share: float, corners: float) -> str:
    """Shape word from three bounding-box measurements.

    ``fill``: area / box area; ``top_share``: share of the area in the top half
    of the box; ``corners``: mean filled share of the four corner cells (each a
    quarter of the box's width and height).  Ideal values:

    ============  =====  =========  =======
    shape         fill   top_share  corners
    ============  =====  =========  =======
    square        1.00   0.50       1.00
    circle        0.79   0.50       0.31
    triangle (^)  0.50   0.25       0.38 (0 top, 0.75 bottom)
    star          0.41   0.46       0.09
    ============  =====  =========  =======

    Star first: sparse (fill below 0.6, where circles and squares never go), corners nearly empty (a triangle's
    bottom corners are 3/4 full, so its mean stays near 0.38) and balanced top/bottom (a triangle's top share is
    0.25 or 0.75).

    Triangle vs the rest: ``tri`` is how far the blob moves from a circle
    towards a triangle, in fill and in top/bottom balance (0 for a circle, 2
    for a triangle; ``abs`` so a downward triangle counts too); the threshold
    sits between the worst degraded circles (~0.55) and triangles (~0.78).
    Circle vs square uses the corners, not the fill: blur rounds a square's
    corners and pulls its fill towards a circle's, but its corner cells stay
    mostly full (mildly blurred squares >= ~0.7, small circles at 64 px <= ~0.53).
    """
    if fill < 0.6 and corners < STAR_MAX_CORNERS and abs(top_share - 0.5) < 0.15:
        return "star"
    tri = (0.785 - fill) / 0.285 + abs(top_share - 0.5) / 0.25
    if tri > 0.66:
        return "triangle"
    return "square" if corners >= 0.58 else "circle"


def _corner_fill(box: np.ndarray) -> float:
    """Mean filled share of the four corner cells (1/4 x 1/4 of the box each)."""
    h, w = box.shape
    ch, cw = max(1, round(h / 4)), max(1, round(w / 4))
    cells = (box[:ch, :cw], box[:ch, -cw:], box[-ch:, :cw], box[-ch:, -cw:])
    return float(np.mean([c.mean() for c in cells]))


def detect_blobs(image: Image.Image | np.ndarray, *, min_area_frac: float = MIN_AREA_FRAC) -> list[Blob]:
    """Significant coloured blobs of ``image``, largest first."""
    rgb = _to_rgb_array(image)
    h, w = rgb.shape[:2]
    chroma = rgb.max(-1) - rgb.min(-1)
    hue = _hue(rgb)
    d = np.abs(hue[..., None] - _PALETTE_HUE)
    d = np.minimum(d, 360.0 - d)
    cls = d.argmin(-1)
    alpha = np.clip(chroma / _PALETTE_CHROMA[cls], 0.0, 1.0)
    # A 3x3 median keeps edges and corners but stops pixel noise from making
    # the outline ragged (one stray pixel would stretch a blob's bounding box).
    mask = ndimage.median_filter(alpha, size=3) >= ALPHA_THRESHOLD

    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    blobs = []
    min_area = min_area_frac * h * w
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        comp = ndimage.binary_fill_holes(labels[sl] == i)
        area = int(comp.sum())
        if area < min_area:
            continue
        # colour: coverage-weighted vote of the pixels actually in the blob
        inside = labels[sl] == i
        votes = np.bincount(cls[sl][inside], weights=alpha[sl][inside], minlength=len(_COLOR_NAMES))
        k = int(votes.argmax())
        ys, xs = np.nonzero(comp)
        ys, xs = ys + sl[0].start, xs + sl[1].start
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        bw, bh = x1 - x0, y1 - y0
        fill = area / float(bw * bh)
        mid = (y0 + y1) / 2.0
        top = np.clip(mid - (ys + 0.0), 0.0, 1.0).sum()  # rows fully above mid count 1, a split row 0.5
        top_share = float(top) / area
        box = comp[y0 - sl[0].start : y1 - sl[0].start, x0 - sl[1].start : x1 - sl[1].start]
        corners = _corner_fill(box)
        cx, cy = (x0 + x1) / 2.0 / w, (y0 + y1) / 2.0 / h
        blobs.append(
            Blob(
                color=_COLOR_NAMES[k],
                color_purity=float(votes[k] / max(votes.sum(), 1e-6)),
                area_frac=area / float(h * w),
                cx=float(cx),
                cy=float(cy),
                width=bw / w,
                height=bh / h,
                fill=float(fill),
                top_share=top_share,
                corners=corners,
                shape=classify_shape(fill, top_share, corners),
                position=classify_position(cx, cy),
            )
        )
    blobs.sort(key=lambda b: -b.area_frac)
    return blobs


# ----------------------------------------------------------------- scoring


def _agreement(part: tuple[str, str, str], blob: Blob | None) -> tuple[bool, bool, bool]:
    if blob is None:
        return (False, False, False)
    c, s, p = part
    return (blob.color == c, blob.shape == s, blob.position == p)


def _match(parts: Sequence[tuple[str, str, str]], blobs: Sequence[Blob]) -> list[Blob | None]:
    """Blob for each part (injective), maximising colour > position > shape agreement."""
    slots: list[Blob | None] = list(blobs) + [None] * len(parts)
    best, best_key = None, None
    for perm in itertools.permutations(range(len(slots)), len(parts)):
        chosen = [slots[j] for j in perm]
        key = 0
        for part, blob in zip(parts, chosen):
            c, s, p = _agreement(part, blob)
            key += 4 * c + 2 * p + 1 * s
        if best_key is None or key > best_key:
            best, best_key = chosen, key
    return best  # type: ignore[return-value]


def score(image: Image.Image | np.ndarray, caption: str, *, min_area_frac: float = MIN_AREA_FRAC) -> AdherenceResult:
    """Check ``image`` against ``caption`` (a shapes-grammar caption, adapters' words included; ValueError
    otherwise).

    ``image``: PIL image or HxWx3 array (uint8, or float in [0, 1]), any size
    >= 64 px (smaller works for large shapes only).
    """
    return score_blobs(detect_blobs(image, min_area_frac=min_area_frac), caption)


def score_blobs(blobs: Sequence[Blob], caption: str) -> AdherenceResult:
    """:func:`score` on blobs already detected (to test many captions on one image)."""
    parts = parse_caption(caption, extended=True)
    # Extra blobs beyond a few cannot match anything but make matching slow.
    matched = _match(parts, blobs[:6])
    results = []
    for part, blob in zip(parts, matched):
        c_ok, s_ok, p_ok = _agreement(part, blob)
        results.append(
            PartResult(
                *part,
                color_ok=c_ok,
                shape_ok=s_ok,
                position_ok=p_ok,
                found_color=blob.color if blob else None,
                found_shape=blob.shape if blob else None,
                found_position=blob.position if blob else None,
            )
        )
    return AdherenceResult(
        caption=caption,
        parts=results,
        count_ok=len(blobs) == len(parts),
        n_expected=len(parts),
        n_found=len(blobs),
        blobs=list(blobs),
    )


def score_many(
    images: Iterable[Image.Image | np.ndarray], captions: Iterable[str], **kwargs: Any
) -> dict[str, float]:
    """Summary over many (image, caption) pairs.

    ``all_correct`` and ``count`` are fractions of images; ``color``, ``shape``
    and ``position`` are fractions of caption parts (shapes mentioned), so a
    two-shape caption counts twice for them.
    """
    n = n_all = n_count = n_parts = n_color = n_shape = n_pos = 0
    for image, caption in zip(images, captions, strict=True):
        r = score(image, caption, **kwargs)
        n += 1
        n_all += r.all_correct
        n_count += r.count_ok
        for p in r.parts:
            n_parts += 1
            n_color += p.color_ok
            n_shape += p.shape_ok
            n_pos += p.position_ok
    if n == 0:
        raise ValueError("no images to score")
    return {
        "n": n,
        "all_correct": n_all / n,
        "color": n_color / n_parts,
        "shape": n_shape / n_parts,
        "position": n_pos / n_parts,
        "count": n_count / n,
    }
