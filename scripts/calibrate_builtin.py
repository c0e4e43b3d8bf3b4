"""Calibrate the shipped profiles of the built-in models (`accel/models/profiles/<name>.json`, package data).

Each is what `accel calibrate --model <name> --out accel/models/profiles/<name>.json` writes: shapes-flux at 28 steps
on 8 training captions (its held-out captions stay out of calibration), every random-weight model on 2 generic
prompts at its default size and steps (those profiles say "random weights": their numbers exercise the machinery,
they say nothing about a real model), except bench-flux (512x512, its transformer dominates: one run takes seconds
on this CPU), calibrated on one prompt at 10 steps (requests at its default 20 steps fall back to that bucket, with
a note). A built-in model's LoRA adapters get their own profiles (`<name>+<adapter>.json`, at scale 1, on captions
that use the adapter: `ADAPTER_PROMPTS`); requests with another adapter set use the base model's, with a note.
Resumable like the command: rerun after Ctrl-C.

    .venv/bin/python scripts/calibrate_builtin.py                 # every built-in model without a profile
    .venv/bin/python scripts/calibrate_builtin.py tiny-flux --force
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.calibration.calibrate import calibrate  # noqa: E402
from accel.calibration.profile import builtin_profile_path  # noqa: E402
from accel.loading import load_pipeline  # noqa: E402
from accel.models.registry import BUILTIN_MODELS  # noqa: E402


# models too slow on this CPU for the full default
REDUCED = {"bench-flux": {"steps": 10, "prompts": ["a red circle on the left"]}}
# calibration captions of the built-in adapters (training triples of the adapter's word; held-out ones stay unseen)
ADAPTER_PROMPTS = {("shapes-flux", "star"): "scripts/prompts/shapes-star-train.txt"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="built-in names (default: all)")
    parser.add_argument("--force", action="store_true", help="recalibrate models that already have a profile")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models or list(BUILTIN_MODELS):
        out = builtin_profile_path(name)
        if out.is_file() and not args.force:
            print(f"{name}: {out.relative_to(ROOT)} exists (--force to redo)")
        else:
            calibrate_base(name, out)
        for (model, adapter), prompts in ADAPTER_PROMPTS.items():
            out = builtin_profile_path(f"{name}+{adapter}")
            if model != name:
                continue
            if out.is_file() and not args.force:
                print(f"{name}+{adapter}: {out.relative_to(ROOT)} exists (--force to redo)")
                continue
            calibrate_adapter(name, adapter, prompts, out)


def calibrate_base(name: str, out: Path) -> None:
    start = time.perf_counter()
    try:
        pipe = load_pipeline(name, builtin_loras=False)  # adapters are per request: the base model is calibrated
    except ImportError as exc:  # e.g. Qwen-Image-Edit's processor needs torchvision
        print(f"{name}: skipped, cannot be built here: {exc}", flush=True)
        return
    options = REDUCED.get(name, {})
    flags = "".join(f" --{key} {value}" for key, value in options.items() if key != "prompts")
    flags += " --prompts <(echo ...)" if "prompts" in options else ""  # the one prompt is in the profile
    profile = calibrate(pipe, out, model=name, **options, command=f"accel calibrate --model {name}{flags} --out "
                        f"accel/models/profiles/{name}.json")
    report(name, profile, start)


def calibrate_adapter(name: str, adapter: str, prompts: str, out: Path) -> None:
    """The model with `adapter` at scale 1, on captions that use it."""
    start = time.perf_counter()
    pipe = load_pipeline(name)
    captions = [line.strip() for line in (ROOT / prompts).read_text().splitlines() if line.strip()]
    profile = calibrate(pipe, out, model=name, prompts=captions, lora=[{"name": adapter, "scale": 1.0}],
                        command=f"accel calibrate --model {name} --prompts {prompts} --lora {adapter}=1 "
                        f"--out accel/models/profiles/{name}+{adapter}.json")
    report(f"{name}+{adapter}", profile, start)


def report(label: str, profile, start: float) -> None:
    bucket = profile.buckets[0]
    print(f"{label}: {len(bucket.settings)} settings at {bucket.describe()}, front {len(bucket.front)}, "
          f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
