"""Every method's default on every built-in family model: exact block fractions and fidelity (PSNR/SSIM against the
plain output of the same seed), baseline and accelerated interleaved in one process (`accel.eval.bench`).

The models have random weights: the numbers show how far each method moves the output and how much work it skips
at its default knobs, not whether a trained model would still look right. Time ratios on these tiny models measure
Python overhead, not transformer work; the block fraction is exact.

    python scripts/bench_families.py [--models tiny-ltx,...] [--out out/families]

writes out/families/<model>/report.json (+ .md, grid.png) and out/families/summary.md (one table, all models).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from accel import load_pipeline
from accel.adapters import adapter_for
from accel.errors import AccelError
from accel.eval.bench import BenchCase, run_bench
from accel.generate import GenerationParams, generate, model_info
from accel.methods import METHODS
from accel.spec import parse_spec

MODELS = ("tiny-flux2", "tiny-qwen-image", "tiny-zimage", "tiny-pixart", "tiny-wan22", "tiny-wan22-i2v",
          "tiny-hunyuanvideo15", "tiny-ltx", "tiny-cogvideox")
PROMPTS = ("a red circle on the left", "a blue square at the top and a green triangle on the right")
VIDEO = dict(height=32, width=32)
IMAGE = Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3))  # image-to-video input
SKIPPED_DEFAULTS = {"prune": "needs a calibrated plan (`accel prune calibrate`) or named blocks"}


def default_specs(pipe) -> tuple[list[str], dict[str, str]]:
    """Each method's default spec the model accepts, and why the others are not run."""
    family = adapter_for(pipe).family
    specs, refused = [], {}
    for name, method in METHODS.items():
        if name in SKIPPED_DEFAULTS:
            refused[name] = SKIPPED_DEFAULTS[name]
        elif method.families is not None and family not in method.families:
            refused[name] = f"not available for {family}"
        else:
            specs.append(name)
    return specs, refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default="out/families")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    lines = ["| model | spec | blocks computed | PSNR (dB) | SSIM | note |", "|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        pipe = load_pipeline(name)
        pipe.set_progress_bar_config(disable=True)
        params = dict(VIDEO) if pipe.accel_defaults.num_frames else {}
        inputs = {"images": [IMAGE]} if "image-to-video" in model_info(pipe).tasks else {}
        specs, refused = default_specs(pipe)
        runnable = []
        for spec in specs:
            try:  # a short call: some defaults are refused only when the call starts (MagCache's ratios)
                generate(pipe, GenerationParams.parse(prompt=PROMPTS[0], num_inference_steps=2, **params, **inputs),
                         parse_spec(spec))
                runnable.append(spec)
            except AccelError as exc:
                refused[spec] = str(exc)
        report = run_bench(pipe, runnable, [BenchCase(p, 0) for p in PROMPTS], params=params, inputs=inputs,
                           out_dir=out / name, model_name=name, progress=False)
        for row in report["results"]:
            if row["spec"] == "off":
                continue
            lines.append(f"| `{name}` | `{row['spec']}` | {row['block_fraction_computed']:.3f} | "
                         f"{row['psnr']:.2f} | {row['ssim']:.3f} | |")
        for spec, why in refused.items():
            lines.append(f"| `{name}` | `{spec}` | – | – | – | {why} |")
        print(name, "done", flush=True)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
