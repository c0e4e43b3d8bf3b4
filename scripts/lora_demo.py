"""The built-in `star` LoRA adapter of shapes-flux: base vs LoRA for the same seeds, and every preset with it.

    python scripts/lora_demo.py --grid docs/lora_star.png            # README's picture (CPU, seconds)
    python scripts/lora_demo.py --bench 15                           # docs/benchmarks.md "LoRA with accelerators"

The grid has one column per held-out star caption (`STAR_HELDOUT_TRIPLES`, never in the adapter's training), seed
i for column i: the top row without the adapter (`lora: []`), the bottom row with it (`lora: [{"name": "star",
"scale": 1}]`), each image marked with the scorer's verdict. The bench runs every preset with the adapter on N
held-out star captions and prints PSNR against the adapter's own un-accelerated output (the LoRA baseline), the
star adherence with and without acceleration, and the work (fraction of transformer blocks computed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel.eval.metrics import psnr  # noqa: E402
from accel.eval.shapes_scorer import score, score_many  # noqa: E402
from accel.generate import GenerationParams, generate  # noqa: E402
from accel.loading import load_pipeline  # noqa: E402
from accel.presets import PRESETS  # noqa: E402
from tools.refmodel.data import star_captions  # noqa: E402

STAR = [{"name": "star", "scale": 1.0}]


def run(pipe, captions, lora, spec=None):
    images, reports = [], []
    for i, caption in enumerate(captions):
        result = generate(pipe, GenerationParams(prompt=caption, seed=i, lora=lora), spec)
        images.append((result.images[0] * 255).round().astype(np.uint8))
        reports.append(result.report)
    return images, reports


def grid(pipe, path: Path, n: int) -> None:
    captions = star_captions("heldout", n)
    rows = [("no adapter", run(pipe, captions, [])[0]), ("lora star=1.0", run(pipe, captions, STAR)[0])]
    side, label_w, text_h = 128, 96, 30
    canvas = Image.new("RGB", (label_w + n * side, text_h + len(rows) * side), "white")
    draw = ImageDraw.Draw(canvas)
    for j, caption in enumerate(captions):
        for k, line in enumerate([caption[:20], caption[20:40]]):
            draw.text((label_w + j * side + 3, 2 + 12 * k), line, fill=(0, 0, 0))
    for i, (label, images) in enumerate(rows):
        y = text_h + i * side
        draw.text((4, y + side // 2 - 6), label, fill=(0, 0, 0))
        for j, (image, caption) in enumerate(zip(images, captions)):
            canvas.paste(Image.fromarray(image), (label_w + j * side, y))
            ok = score(image, caption).all_correct
            draw.text((label_w + j * side + 3, y + side - 12), "[ok]" if ok else "[x]",
                      fill=(0, 110, 0) if ok else (170, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    print(f"wrote {path}")


def bench(pipe, n: int) -> None:
    captions = star_captions("heldout", n)
    base, _ = run(pipe, captions, [])
    start = time.perf_counter()
    reference, _ = run(pipe, captions, STAR)
    plain_s = time.perf_counter() - start
    print(f"{n} held-out star captions; without the adapter: star adherence {score_many(base, captions)['all_correct']:.3f}")
    print("| preset | spec | PSNR vs LoRA baseline (dB, mean / min) | star adherence | blocks computed | time vs LoRA baseline |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, spec in PRESETS.items():
        start = time.perf_counter()
        images, reports = run(pipe, captions, STAR, spec)
        seconds = time.perf_counter() - start
        values = [min(psnr(r / 255.0, o / 255.0), 99.0) for r, o in zip(reference, images)]
        blocks = np.mean([r.get("block_fraction_computed", 1.0) for r in reports])
        shown = "identical" if min(values) >= 99.0 else f"{np.mean(values):.1f} / {min(values):.1f}"
        spec_text = ";".join(f"{s['method']}" + "".join(f",{k}={v}" for k, v in s.items() if k != "method")
                             for s in spec) or "-"
        print(f"| {name} | `{spec_text}` | {shown} | {score_many(images, captions)['all_correct']:.3f} | "
              f"{blocks:.3f} | {seconds / plain_s:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=Path, default=None, help="write the base-vs-LoRA grid here (PNG)")
    parser.add_argument("--n", type=int, default=5, help="captions in the grid")
    parser.add_argument("--bench", type=int, default=0, help="run every preset with the adapter on N captions")
    args = parser.parse_args()
    pipe = load_pipeline("shapes-flux")
    if args.grid:
        grid(pipe, args.grid, args.n)
    if args.bench:
        bench(pipe, args.bench)


if __name__ == "__main__":
    main()
