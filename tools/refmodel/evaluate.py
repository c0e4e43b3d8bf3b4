"""Prompt adherence of a shapes model: generate from held-out and training captions, score with the exact scorer.

    python -m tools.refmodel.evaluate [--model DIR] [--steps 28] [--n 64] [--grid docs/refmodel_grid.png]

Three caption sets (each image gets its own seed, ``seed + i``, so results do not depend on the batch size):

- ``heldout_single``: ``heldout_captions("single", n)``: one shape whose (colour, shape, position) never appeared
  in training;
- ``heldout_double``: ``heldout_captions("double", n)``: two shapes, at least one of them held out;
- ``train``: captions of the training split (``ShapesDataset("train")``, half of them two-shape).

For each set it prints and returns ``score_many``'s fractions (``all_correct`` = colour, shape, position and count
all right).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from accel.eval.shapes_scorer import score, score_many
from accel.models.shapes_flux import MAX_SEQUENCE_LENGTH, load_shapes_flux
from tools.refmodel.data import ShapesDataset, heldout_captions

__all__ = ["caption_sets", "generate_images", "evaluate", "write_grid", "main"]


def caption_sets(n: int, seed: int = 0, n_double: int | None = None, n_train: int | None = None) -> dict[str, list[str]]:
    """The evaluation captions: held-out single, held-out double, training captions."""
    n_double = n if n_double is None else n_double
    n_train = n if n_train is None else n_train
    sets = {
        "heldout_single": heldout_captions("single", n, seed=seed),
        "heldout_double": heldout_captions("double", n_double, seed=seed),
        # far past the indices a training run's latent pool draws from, same distribution
        "train": ShapesDataset("train", seed=0, length=10**9).captions(10**8 + 1000 * seed, 10**8 + 1000 * seed + n_train),
    }
    return {k: v for k, v in sets.items() if v}


@torch.no_grad()
def generate_images(
    pipe: Any,
    captions: Sequence[str],
    *,
    steps: int = 28,
    seed: int = 0,
    height: int = 128,
    width: int = 128,
    batch_size: int = 16,
    **kwargs: Any,
) -> list[np.ndarray]:
    """uint8 HxWx3 images for ``captions``; image i uses ``torch.Generator().manual_seed(seed + i)``."""
    kwargs.setdefault("max_sequence_length", MAX_SEQUENCE_LENGTH)
    out: list[np.ndarray] = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start : start + batch_size])
        gens = [torch.Generator(device="cpu").manual_seed(seed + start + j) for j in range(len(chunk))]
        images = pipe(
            chunk,
            height=height,
            width=width,
            num_inference_steps=steps,
            generator=gens,
            output_type="np",
            **kwargs,
        ).images
        out.extend((np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8))
    return out


def evaluate(
    pipe: Any,
    n: int = 64,
    *,
    steps: int = 28,
    seed: int = 0,
    n_double: int | None = None,
    n_train: int | None = None,
    batch_size: int = 16,
    return_images: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Adherence fractions per caption set (``{"heldout_single": {...}, ...}``); images too if asked."""
    results: dict[str, Any] = {}
    images: dict[str, tuple[list[np.ndarray], list[str]]] = {}
    for name, captions in caption_sets(n, seed, n_double, n_train).items():
        t0 = time.perf_counter()
        imgs = generate_images(pipe, captions, steps=steps, seed=seed, batch_size=batch_size)
        res = score_many(imgs, captions)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = res
        images[name] = (imgs, captions)
        if verbose:
            print(
                f"{name:15s} n={res['n']:3d}  all_correct={res['all_correct']:.3f}  color={res['color']:.3f}  "
                f"shape={res['shape']:.3f}  position={res['position']:.3f}  count={res['count']:.3f}  "
                f"({res['seconds']:.1f} s)",
                flush=True,
            )
    if return_images:
        results["_images"] = images
    return results


def write_grid(
    images: Sequence[np.ndarray], captions: Sequence[str], path: str | Path, cols: int = 4, text_height: int = 40
) -> Path:
    """A grid PNG, each image with its caption (wrapped) underneath."""
    if not images:
        raise ValueError("no images")
    h, w = images[0].shape[:2]
    rows = (len(images) + cols - 1) // cols
    pad = 4
    cell_w, cell_h = w + 2 * pad, h + text_height + 2 * pad
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), (235, 235, 235))
    draw = ImageDraw.Draw(grid)
    for i, (img, cap) in enumerate(zip(images, captions)):
        x, y = (i % cols) * cell_w + pad, (i // cols) * cell_h + pad
        grid.paste(Image.fromarray(img), (x, y))
        ok = score(img, cap).all_correct
        words, lines, line = cap.split(), [], ""
        for word in words:
            if len(line) + len(word) + 1 > 24 and line:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        lines[-1] += "  [ok]" if ok else "  [x]"
        for k, text in enumerate(lines[:4]):
            draw.text((x, y + h + 1 + 9 * k), text, fill=(0, 110, 0) if ok else (170, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers directory (default: the committed shapes-flux weights)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--n", type=int, default=64, help="captions per set")
    p.add_argument("--n-double", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grid", default=None, help="write a 4x4 sample grid PNG here")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = load_shapes_flux(weights_dir=args.model)
    results = evaluate(
        pipe,
        args.n,
        steps=args.steps,
        seed=args.seed,
        n_double=args.n_double,
        n_train=args.n_train,
        batch_size=args.batch_size,
        return_images=bool(args.grid),
    )
    images = results.pop("_images", None)
    if args.grid and images:
        picks: list[tuple[np.ndarray, str]] = []
        for name, k in (("heldout_single", 6), ("heldout_double", 6), ("train", 4)):
            if name in images:
                imgs, caps = images[name]
                picks += list(zip(imgs[:k], caps[:k]))
        write_grid([i for i, _ in picks], [c for _, c in picks], args.grid)
        print(f"grid written to {args.grid}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
