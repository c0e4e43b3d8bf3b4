"""Benchmark of S²-Guidance (time per step) and pruned blocks (speed, parameters, fidelity) on a random model.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_s2_prune.py --model bench-flux --size 256 --steps 8

Times: median of `--repeats` interleaved runs in one process (CPU, shared cores: ratios, not absolute times).
Fidelity: PSNR/SSIM of the decoded image against the unpruned (or un-guided) output of the same prompt and seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from accel import accelerate
from accel.eval.metrics import psnr, ssim
from accel.loading import load_pipeline
from accel.pruning.importance import calibrate

PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle in the middle"]


def _run(pipe, prompt, seed, kwargs, spec=None, accel_seed=0):
    start = time.perf_counter()
    with accelerate(pipe, spec, seed=accel_seed) as report:
        out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images
    return np.asarray(out), time.perf_counter() - start, report.as_dict()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="bench-flux")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib-steps", type=int, default=4)
    parser.add_argument("--out", default="out/bench_s2_prune.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    kwargs = dict(height=args.size, width=args.size, num_inference_steps=args.steps, max_sequence_length=128)
    base = load_pipeline(args.model)
    results: dict = {"model": args.model, "size": args.size, "steps": args.steps}

    # -- S²: time per step with and without, interleaved -------------------------------------------------------
    specs = {"baseline": None, "s2": "s2", "s2:all-steps": "s2:interval=[0,1]"}
    times = {k: [] for k in specs}
    reports = {}
    _run(base, PROMPTS[0], 0, kwargs)  # warm-up
    for _ in range(args.repeats):
        for label, spec in specs.items():
            _, seconds, report = _run(base, PROMPTS[0], 0, kwargs, spec)
            times[label].append(seconds)
            reports[label] = report
    med = {k: statistics.median(v) for k, v in times.items()}
    results["s2"] = {label: {"seconds": round(med[label], 3), "ratio": round(med[label] / med["baseline"], 3),
                             "active_steps": reports[label]["details"].get("s2", {}).get("active_steps", 0),
                             "extra_forwards": reports[label]["extra_forwards"]} for label in specs}
    print(json.dumps(results["s2"], indent=1), flush=True)

    # -- pruning: calibrate once, then each ratio x score ---------------------------------------------------------
    start = time.perf_counter()
    plan = calibrate(base, PROMPTS[:2], steps=args.calib_steps, seeds=1, progress=False,
                     height=args.size, width=args.size)
    results["calibration_seconds"] = round(time.perf_counter() - start, 1)
    plan_path = Path(tempfile.mkdtemp()) / "plan.json"
    plan.save(plan_path)
    results["plan"] = {k: v for k, v in plan.to_dict().items() if k in ("orders", "scores")}
    n_params = lambda p: sum(x.numel() for x in p.transformer.parameters())  # noqa: E731
    refs = {(p, s): _run(base, p, s, kwargs)[0] for p in PROMPTS for s in (0,)}
    rows = []
    for ratio in (0.1, 0.2, 0.3):
        for score in ("influence", "angular", "drop_one"):
            pruned = load_pipeline(args.model)
            from accel.pruning.plan import prune_pipeline

            removed = prune_pipeline(pruned, plan_path, ratio, score)
            pruned_times, base_times, ps, ss = [], [], [], []
            for prompt in PROMPTS:
                out, _, _ = _run(pruned, prompt, 0, kwargs)
                ps.append(psnr(refs[(prompt, 0)], out))
                ss.append(ssim(refs[(prompt, 0)], out))
            for _ in range(args.repeats):
                base_times.append(_run(base, PROMPTS[0], 0, kwargs)[1])
                pruned_times.append(_run(pruned, PROMPTS[0], 0, kwargs)[1])
            row = {"ratio": ratio, "score": score, "removed": removed,
                   "speed_ratio": round(statistics.median(pruned_times) / statistics.median(base_times), 3),
                   "params_ratio": round(n_params(pruned) / n_params(base), 3),
                   "psnr": round(float(np.mean(ps)), 2), "ssim": round(float(np.mean(ss)), 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del pruned
    results["pruning"] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
