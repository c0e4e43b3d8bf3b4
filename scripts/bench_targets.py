"""Fidelity targets, measured: the calibrated fronts of the shipped profiles, and targets checked on held-out prompts.

    .venv/bin/python scripts/bench_targets.py fronts              # docs/pareto_<model>.png + out/targets/fronts.md
    .venv/bin/python scripts/bench_targets.py heldout             # shapes-flux, 32 held-out captions, 3 targets

`heldout`: for each held-out caption of shapes-flux (scripts/prompts/shapes-heldout.txt; calibration used training
captions only) the plain output, then for each PSNR target the setting the profile chooses, run without and with
the fidelity guard. It reports the share of prompts meeting each target, the work (attention computations counted
on to_q, as in calibration), the PSNR, and the estimate's mean absolute error against the measured PSNR.
Writes out/targets/heldout.json and out/targets/heldout.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.calibration.profile import PROFILES_DIR, load_profile  # noqa: E402
from accel.eval.frontier import AttentionCounter  # noqa: E402
from accel.eval.metrics import psnr  # noqa: E402
from accel.generate import GenerationParams, generate  # noqa: E402
from accel.loading import load_pipeline  # noqa: E402

TARGETS = (30.0, 35.0, 40.0)
OUT = ROOT / "out" / "targets"


def heldout_captions() -> list[str]:
    return [line.strip() for line in (ROOT / "scripts/prompts/shapes-heldout.txt").read_text().splitlines()
            if line.strip()]


def run_heldout(args) -> dict:
    """Every target on every held-out caption, without and with the guard."""
    pipe = load_pipeline("shapes-flux", builtin_loras=False)
    pipe.set_progress_bar_config(disable=True)
    counter = AttentionCounter(pipe)
    prompts = heldout_captions()[: args.prompts]
    rows = []
    started = time.perf_counter()

    def one(prompt, spec):
        counter.count = 0
        result = generate(pipe, GenerationParams.parse(prompt=prompt, seed=args.seed), spec)
        return result, counter.count

    one(prompts[0], None)
    for i, prompt in enumerate(prompts):
        plain, plain_work = one(prompt, None)
        for target in args.targets:
            for guard in (False, True):
                result, work = one(prompt, {"target": {"psnr": target, "guard": guard}})
                estimate = result.report.get("estimate") or {}
                rows.append({"prompt": prompt, "target": target, "guard": guard,
                             "chosen": result.report["target"]["chosen"],
                             "expected": result.report["target"]["expected_psnr"],
                             "psnr": psnr(plain.images, result.images), "work": work / plain_work,
                             "estimate": estimate.get("psnr"),
                             "tightened_at": (estimate.get("guard") or {}).get("tightened_at_step")})
        print(f"{i + 1}/{len(prompts)} ({time.perf_counter() - started:.0f} s): {prompt}", flush=True)
    counter.remove()
    return {"model": "shapes-flux", "prompts": prompts, "seed": args.seed, "targets": list(args.targets),
            "command": "python scripts/bench_targets.py heldout"
            + (f" --prompts {args.prompts}" if args.prompts else ""),
            "seconds": round(time.perf_counter() - started), "rows": rows, "summary": summarise(rows, args.targets)}


def summarise(rows: list[dict], targets) -> list[dict]:
    summary = []
    for target in targets:
        for guard in (False, True):
            mine = [r for r in rows if r["target"] == target and r["guard"] == guard]
            values = [r["psnr"] for r in mine]
            estimated = [(r["estimate"], r["psnr"]) for r in mine if r["estimate"] is not None]
            summary.append({
                "target": target, "guard": guard, "chosen": mine[0]["chosen"], "expected": mine[0]["expected"],
                "met": float(np.mean([v >= target for v in values])), "work": float(np.mean([r["work"] for r in mine])),
                "psnr_median": float(statistics.median(values)), "psnr_p10": float(np.percentile(values, 10)),
                "psnr_min": float(min(values)),
                "estimate_mae": float(np.mean([abs(e - p) for e, p in estimated])) if estimated else None,
                "tightened": float(np.mean([r["tightened_at"] is not None for r in mine])),
            })
    return summary


def heldout_markdown(report: dict) -> str:
    out = [f"Held-out check on `shapes-flux`: {len(report['prompts'])} held-out captions "
           f"(scripts/prompts/shapes-heldout.txt, none used in calibration), seed {report['seed']}, 28 steps. "
           f"Command: `{report['command']}` ({report['seconds']} s).", "",
           "| target PSNR | guard | chosen setting | expected median / p10 (dB) | prompts meeting the target | "
           "work | PSNR median / p10 / min (dB) | estimate MAE (dB) | guard acted |",
           "|---|---|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        out.append(f"| {s['target']:g} | {'on' if s['guard'] else 'off'} | `{s['chosen']}` | "
                   f"{s['expected']['median']:.1f} / {s['expected']['p10']:.1f} | {100 * s['met']:.0f}% | "
                   f"{100 * s['work']:.1f}% | {s['psnr_median']:.1f} / {s['psnr_p10']:.1f} / {s['psnr_min']:.1f} | "
                   f"{'–' if s['estimate_mae'] is None else format(s['estimate_mae'], '.2f')} | "
                   f"{100 * s['tightened']:.0f}% |")
    return "\n".join(out) + "\n"


# -- fronts ----------------------------------------------------------------------------------------------------
def fronts(args) -> str:
    lines = []
    for path in sorted(PROFILES_DIR.glob("*.json")):
        profile = load_profile(path)
        name = path.stem  # the model, or model+adapter for a LoRA adapter set's profile
        for bucket in profile.buckets:
            tag = " (random weights: the numbers exercise the machinery only)" if profile.random_weights else ""
            lines += ["", f"#### `{name}`{tag}", "",
                      f"{bucket.describe()}, {len(bucket.prompts)} calibration prompt(s), {len(bucket.settings)} "
                      f"settings, device {profile.device}. Command: `{profile.command}`."
                      + (f" Plot: `docs/pareto_{name}.png`." if args.plots else ""), "",
                      "| setting on the front | work | speedup (measured) | PSNR median (dB) | PSNR p10 (dB) |",
                      "|---|---|---|---|---|"]
            for spec in bucket.front:
                s = bucket.setting(spec)
                lines.append(f"| `{spec}` | {100 * s.work:.1f}% | {s.speedup:.2f}x | {s.psnr_median:.1f} | "
                             f"{s.psnr_p10:.1f} |")
            if profile.estimator is not None and profile.estimator.mae_db:
                lines += ["", "Estimator fit (calibration runs), mean absolute error per method: " + ", ".join(
                    f"{m} {v:.1f} dB" for m, v in profile.estimator.mae_db.items()) + "."]
        if args.plots:
            plot(profile, ROOT / "docs" / f"pareto_{name}.png")
    return "\n".join(lines) + "\n"


def plot(profile, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bucket = profile.buckets[0]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for line in sorted({s.line for s in bucket.settings}):
        pts = sorted([s for s in bucket.settings if s.line == line], key=lambda s: s.work)
        (handle,) = ax.plot([100 * s.work for s in pts], [s.psnr_median for s in pts], "o", markersize=4,
                            label=f"{line} (median)", alpha=0.8)
        ax.plot([100 * s.work for s in pts], [s.psnr_p10 for s in pts], "v", markersize=4,
                color=handle.get_color(), alpha=0.5)
    front = [bucket.setting(spec) for spec in bucket.front]
    ax.plot([100 * s.work for s in front], [s.psnr_p10 for s in front], "k-", linewidth=1.5,
            label="front (p10 over prompts)")
    ax.set_xlabel("work: attention computations, % of the plain run")
    ax.set_ylabel("PSNR vs plain output (dB): o median, v 10th percentile")
    title = f"Calibrated front, {profile.model}, {bucket.describe()}"
    ax.set_title(title + (" (random weights)" if profile.random_weights else ""), fontsize=10)
    ax.set_ylim(max(10, min(s.psnr_p10 for s in bucket.settings) - 2), 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["fronts", "heldout"])
    parser.add_argument("--prompts", type=int, default=None, help="heldout: first N held-out captions (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    parser.add_argument("--no-plots", dest="plots", action="store_false")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.what == "fronts":
        text = fronts(args)
        (OUT / "fronts.md").write_text(text)
    else:
        report = run_heldout(args)
        (OUT / "heldout.json").write_text(json.dumps(report, indent=1))
        text = heldout_markdown(report)
        (OUT / "heldout.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
