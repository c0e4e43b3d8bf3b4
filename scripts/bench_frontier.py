"""The caching frontier: work vs fidelity of every cache setting, ours and the peers', measured side by side.

One process loads a built-in model, computes the plain output of each prompt, then runs every setting of the sweep
on every prompt, interleaved with plain runs (the order rotates per prompt). Work is counted *outside* the methods:
a forward pre-hook on every attention's query projection (`to_q`) counts attention computations, so a block, an
attention or a whole step that any cache skips (ours, diffusers', cache-dit's) makes none. Fidelity is PSNR against
the plain output of the same prompt and seed (`accel.eval.metrics`). Wall-clock: each run's time over the time of
the nearest plain run of the same prompt, median over prompts (CPU: ratios only).

For each method (one line: a method and its knob sweep) the frontier is its Pareto set (less work, higher PSNR);
at each target PSNR the work is interpolated linearly on that frontier. Ours = the best of our lines, peer = the best
of the peers' lines; the target is met when ours <= peer / 1.3.

    .venv/bin/python scripts/bench_frontier.py --model shapes-flux            # 6 held-out captions, 28 steps
    .venv/bin/python scripts/bench_frontier.py --model bench-flux             # random weights, 2 prompts, 20 steps
    .venv/bin/python scripts/bench_frontier.py --only abcache_adaptive --spec "abcache_adaptive:tolerance=0.2"

Writes out/frontier_<model>.json, docs/frontier_<model>.md and docs/frontier_<model>.png.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
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

from accel.calibration.calibrate import default_prompts  # noqa: E402
from accel.calibration.schedules import calibrate_schedules  # noqa: E402
from accel.eval.frontier import AttentionCounter, LinearMacCounter, pareto  # noqa: E402  (shared with accel.calibration)
from accel.eval.metrics import psnr  # noqa: E402
from accel.eval.shapes_captions import HELDOUT_TRIPLES, parse_caption  # noqa: E402
from accel.generate import GenerationParams, generate  # noqa: E402
from accel.loading import load_pipeline  # noqa: E402
from accel.spec import parse_spec  # noqa: E402

TARGETS = (30.0, 35.0, 40.0, 45.0, 50.0)
REQUIRED_RATIO = 1.3
PEERS = ("taylorseer", "fbcache", "magcache", "dbcache")


def sweep(model: str, mag: str, schedules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(line, spec) of every setting: each line is one method's knob sweep; `mag` the calibrated MagCache ratios,
    `schedules` the calibrated AB-Cache schedules, (line, spec) (both searched on training captions in this process)."""
    rows = []
    rows += [("taylorseer", f"taylorseer:cache_interval={n}") for n in (2, 3, 4, 5, 6, 8, 10, 12)]
    rows += [("taylorseer order 2", f"taylorseer:cache_interval={n},max_order=2") for n in (2, 3, 4, 5, 6, 8)]
    rows += [("taylorseer warm-up 1", f"taylorseer:cache_interval={n},disable_cache_before_step=1")
             for n in (3, 4, 6, 8, 10)]
    rows += [("fbcache", f"fbcache:threshold={t}") for t in (0.03, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4)]
    rows += [("magcache", f"magcache:threshold={t},max_skip_steps={s},mag_ratios=[{mag}]")
             for t, s in ((0.03, 2), (0.06, 3), (0.12, 4), (0.24, 6), (0.5, 8))]
    rows += [("dbcache", f"dbcache:Fn=1,threshold={t}") for t in (0.04, 0.08, 0.16, 0.24, 0.32, 0.5)]
    rows += [("sortblock", s) for s in ("sortblock:K=3,beta=0.1", "sortblock", "sortblock:K=8,beta=0.1")]
    rows += [("abcache", f"abcache:interval={n}") for n in (2, 3, 4, 6, 8)]
    rows += schedules
    rows += [("abcache_adaptive", f"abcache_adaptive:tolerance={t}") for t in (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.3)]
    rows += [("abcache_adaptive higher", f"abcache_adaptive:tolerance={t},estimate=higher") for t in (0.03, 0.05, 0.07)]
    rows += [("abcache_adaptive higher noise_blend", f"abcache_adaptive:tolerance={t},estimate=higher,prediction=noise_blend")
             for t in (0.03, 0.04, 0.05, 0.06, 0.07, 0.1)]
    rows += [("abcache_adaptive correct", f"abcache_adaptive:tolerance={t},correct=true") for t in (0.05, 0.1, 0.15, 0.2, 0.3)]
    rows += [("abcache_adaptive higher correct", f"abcache_adaptive:tolerance={t},estimate=higher,correct=true")
             for t in (0.03, 0.05, 0.07, 0.1, 0.15)]
    rows += [(line + " noise_blend", spec + ",prediction=noise_blend")  # the corrected schedules, with the blend
             for line, spec in schedules if "correct=true" in spec]
    return rows


def held_out_captions(count: int) -> list[str]:
    """The first `count` captions of scripts/prompts/shapes-heldout.txt, half single-shape, half two-shape, each
    with at least one held-out (colour, shape, position) triple (never seen together in training)."""
    lines = [l.strip() for l in (ROOT / "scripts/prompts/shapes-heldout.txt").read_text().splitlines() if l.strip()]
    lines = [l for l in lines if any(t in HELDOUT_TRIPLES for t in parse_caption(l))]
    single = [l for l in lines if len(parse_caption(l)) == 1]
    double = [l for l in lines if len(parse_caption(l)) == 2]
    picked = []
    for i in range(count):
        source = single if i % 2 == 0 else double
        picked.append(source[i // 2])
    return picked


def calibrate_magcache(pipe, prompt: str, steps: int) -> str:
    """This model's MagCache ratios: diffusers' calibration run (it prints them), on a training caption."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        generate(pipe, GenerationParams.parse(prompt=prompt, seed=0, num_inference_steps=steps), "magcache:calibrate=true")
    found = re.findall(r"\[([0-9eE., +-]+)\]", buffer.getvalue())
    if not found:
        raise SystemExit("MagCache calibration printed no ratios")
    return ",".join(f"{float(v):.5f}" for v in found[-1].split(","))


def work_at(front: list[dict], target: float) -> tuple[float | None, str]:
    """Work needed for `target` dB on a frontier: linear between the frontier points around it. ('exact' | 'bound':
    the cheapest point is already above the target, its work is an upper bound | 'not reached': None)."""
    above = [p for p in front if p["psnr"] >= target]
    if not above:
        return None, "not reached"
    hi = above[0]
    below = [p for p in front if p["psnr"] < target and p["work"] < hi["work"]]
    if not below:
        return hi["work"], "bound"
    lo = below[-1]
    share = (target - lo["psnr"]) / (hi["psnr"] - lo["psnr"])
    return lo["work"] + share * (hi["work"] - lo["work"]), "exact"


def targets_table(points: list[dict], work: str = "work") -> list[dict]:
    lines = sorted({p["line"] for p in points})
    points = [dict(p, work=p[work]) for p in points]
    fronts = {line: pareto([p for p in points if p["line"] == line]) for line in lines}
    rows = []
    for target in TARGETS:
        best = {"ours": (None, None, None), "peer": (None, None, None)}
        for line, front in fronts.items():
            side = "peer" if line.split()[0] in PEERS else "ours"
            work, how = work_at(front, target)
            if work is not None and (best[side][0] is None or work < best[side][0]):
                best[side] = (work, line, how)
        ours, peer = best["ours"], best["peer"]
        ratio = peer[0] / ours[0] if ours[0] and peer[0] else None
        rows.append({"psnr": target, "ours_work": ours[0], "ours_line": ours[1], "ours_how": ours[2],
                     "peer_work": peer[0], "peer_line": peer[1], "peer_how": peer[2], "ratio": ratio,
                     "met": ratio is not None and ratio >= REQUIRED_RATIO})
    return rows


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    counter = AttentionCounter(pipe)
    macs = LinearMacCounter(pipe)
    if args.model == "shapes-flux":
        prompts = held_out_captions(args.prompts)
        calibration_prompt = (ROOT / "scripts/prompts/shapes-train.txt").read_text().splitlines()[0].strip()
    else:
        prompts = [l.strip() for l in (ROOT / "scripts/prompts/flux.txt").read_text().splitlines() if l.strip()]
        prompts = (prompts * args.prompts)[: args.prompts]
        calibration_prompt = "a green triangle in the center"
    mag = calibrate_magcache(pipe, calibration_prompt, args.steps)
    schedules: list[tuple[str, str]] = []
    args.found_schedules = {}
    for knobs in args.schedule_knobs:
        line = "abcache calibrated" + (f" {knobs}" if knobs else "")
        if not (re.search(args.only, line) and args.schedule_budgets):
            continue
        found = calibrate_schedules(pipe, default_prompts(args.model, args.schedule_prompts), args.steps,
                                    args.schedule_budgets, seed=args.seed, knobs=knobs)
        schedules += [(line, spec) for spec, _ in found.values()]
        args.found_schedules[line] = {k: {"spec": spec, "calibration_psnr": round(value, 3)}
                                      for k, (spec, value) in found.items()}
        print(f"{line}:", {k: f"{spec} ({value:.2f} dB)" for k, (spec, value) in found.items()}, flush=True)
    settings = [(line, spec) for line, spec in sweep(args.model, mag, schedules) if re.search(args.only, line)]
    settings += [(spec.split(":")[0] + " (extra)", spec) for spec in args.spec]
    settings = [(line, spec) for line, spec in settings if line.split()[0] != "dbcache" or _has_cache_dit()]
    for _, spec in settings:
        parse_spec(spec)  # every spec validates before the first run

    def generate_one(prompt: str, spec: str | None):
        params = GenerationParams.parse(prompt=prompt, seed=args.seed, num_inference_steps=args.steps)
        counter.count = macs.macs = 0
        result = generate(pipe, params, spec)
        return result.images, (counter.count, macs.macs), result.seconds

    generate_one(prompts[0], None)  # one-time costs
    results = {spec: {"line": line, "spec": spec, "work": [], "macs": [], "psnr": [], "time_ratio": []}
               for line, spec in settings}
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        plain, plain_work, plain_seconds = generate_one(prompt, None)
        order = settings[i % len(settings):] + settings[: i % len(settings)]
        for j, (line, spec) in enumerate(order):
            if j and j % args.plain_every == 0:  # a fresh plain time next to the runs it is compared with
                _, _, plain_seconds = generate_one(prompt, None)
            images, work, seconds = generate_one(prompt, spec)
            entry = results[spec]
            entry["work"].append(work[0] / plain_work[0])
            entry["macs"].append(work[1] / plain_work[1])
            entry["psnr"].append(psnr(plain, images))
            entry["time_ratio"].append(seconds / plain_seconds)
        print(f"prompt {i + 1}/{len(prompts)} done ({time.perf_counter() - started:.0f} s): {prompt}", flush=True)
    points = []
    for entry in results.values():
        points.append({"line": entry["line"], "spec": entry["spec"], "work": float(np.mean(entry["work"])),
                       "macs": float(np.mean(entry["macs"])),
                       "psnr": float(np.mean(entry["psnr"])), "time_ratio": float(statistics.median(entry["time_ratio"])),
                       "per_prompt_psnr": entry["psnr"], "per_prompt_work": entry["work"]})
    command = "python scripts/bench_frontier.py " + " ".join(sys.argv[1:])
    return {
        "model": args.model, "steps": args.steps, "seed": args.seed, "prompts": prompts,
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} thread(s))"
        if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "work_counted_by": "forward pre-hooks on every attention's to_q (outside the methods)",
        "magcache_ratios": mag, "calibrated_schedules": getattr(args, "found_schedules", {}), "command": command,
        "seconds": round(time.perf_counter() - started),
        "points": points, "targets": targets_table(points), "targets_macs": targets_table(points, "macs"),
    }


def _has_cache_dit() -> bool:
    try:
        import cache_dit  # noqa: F401
    except ImportError:
        return False
    return True


def _pct(work: float | None, how: str | None) -> str:
    return "–" if work is None else f"{100 * work:.1f}%" + (" (bound)" if how == "bound" else "")


def _short(spec: str) -> str:
    return re.sub(r",?mag_ratios=\[[^\]]*\]", "", spec)


def markdown(report: dict) -> str:
    out = [
        f"# Caching frontier on `{report['model']}`",
        "",
        f"Model `{report['model']}`, {report['steps']} steps, seed {report['seed']}, device {report['device']}; "
        f"{len(report['prompts'])} prompts: " + "; ".join(f"\"{p}\"" for p in report["prompts"]) + ".",
        f"Work = attention computations counted by {report['work_counted_by']}, as a fraction of the plain run's. "
        "PSNR against the plain output (mean over prompts). Time ratio: median over prompts of the run's time over "
        "the nearest plain run's. MagCache uses this model's ratios and `abcache calibrated` this model's schedules "
        "(`accel.calibration.schedules`: searched per budget on training captions, never on these prompts), both "
        "calibrated in the same process.",
        "",
        f"Command: `{report['command']}` ({report['seconds']} s)",
        "",
    ]
    titles = {"targets": "work = attention computations (on `to_q`), the issue's measure",
              "targets_macs": "work = linear-layer multiply-accumulates of the transformer (compute actually run)"}
    for key, title in titles.items():
        out += [f"## Targets, {title}: our best vs the best peer at equal PSNR (interpolated on each method's "
                "frontier)", "",
                "| PSNR (dB) | ours: work | ours: method | best peer: work | best peer: method | peer / ours | met (>= 1.3) |",
                "|---|---|---|---|---|---|---|"]
        for row in report.get(key, []):
            out.append(f"| {row['psnr']:.0f} | {_pct(row['ours_work'], row['ours_how'])} | {row['ours_line'] or '–'} | "
                       f"{_pct(row['peer_work'], row['peer_how'])} | {row['peer_line'] or '–'} | "
                       f"{'–' if row['ratio'] is None else format(row['ratio'], '.2f') + 'x'} | "
                       f"{'yes' if row['met'] else 'no'} |")
        out.append("")
    out += ["## Every setting", "",
            "| method | spec | work (attention) | work (linear MACs) | PSNR (dB) | time ratio (CPU) | on frontier |",
            "|---|---|---|---|---|---|---|"]
    lines = sorted({p["line"] for p in report["points"]}, key=lambda l: (l.split()[0] in PEERS, l))
    for line in lines:
        pts = [p for p in report["points"] if p["line"] == line]
        front = {id(p) for p in pareto(pts)}
        for p in sorted(pts, key=lambda p: p["work"]):
            out.append(f"| {line} | `{_short(p['spec'])}` | {100 * p['work']:.1f}% | "
                       f"{100 * p.get('macs', float('nan')):.1f}% | {p['psnr']:.2f} | "
                       f"{p['time_ratio']:.3f} | {'yes' if id(p) in front else ''} |")
    return "\n".join(out) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    lines = sorted({p["line"] for p in report["points"]}, key=lambda l: (l.split()[0] in PEERS, l))
    measures = (("work", "attention computations, % of the plain run (counted on to_q)"),
                ("macs", "linear-layer multiply-accumulates, % of the plain run"))
    for ax, (key, label) in zip(axes, measures):
        for line in lines:
            pts = [dict(p, work=p.get(key, p["work"])) for p in report["points"] if p["line"] == line]
            front = pareto(pts)
            peer = line.split()[0] in PEERS
            (handle,) = ax.plot([100 * p["work"] for p in front], [p["psnr"] for p in front], "--" if peer else "-",
                                marker="o", markersize=4, label=line + (" (peer)" if peer else ""),
                                linewidth=1.2 if peer else 2.0)
            rest = [p for p in pts if p not in front]
            ax.scatter([100 * p["work"] for p in rest], [p["psnr"] for p in rest], s=10, color=handle.get_color(),
                       alpha=0.4)
        for target in TARGETS:
            ax.axhline(target, color="grey", linewidth=0.5, alpha=0.5)
        ax.set_xlabel("work: " + label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR vs plain output (dB)")
    axes[0].set_ylim(max(15, min(p["psnr"] for p in report["points"]) - 2),
                     min(80, max(p["psnr"] for p in report["points"]) + 3))
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Caching frontier, {report['model']}, {report['steps']} steps, {len(report['prompts'])} prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-flux", choices=["shapes-flux", "bench-flux"])
    parser.add_argument("--steps", type=int, default=None, help="default 28 (shapes-flux), 20 (bench-flux)")
    parser.add_argument("--prompts", type=int, default=None, help="default 6 (shapes-flux), 2 (bench-flux)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=".", help="regex on the line (method) names of the sweep")
    parser.add_argument("--spec", action="append", default=[], help="an extra setting (repeatable)")
    parser.add_argument("--plain-every", type=int, default=6, help="a plain run for timing every N settings")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--schedule-budgets", type=int, nargs="*", default=[3, 4, 5, 6, 7, 8, 9, 10],
                        help="computed steps per call of the calibrated AB-Cache schedules (none: skip the search)")
    parser.add_argument("--schedule-knobs", nargs="*", default=["", "correct=true"],
                        help="AB-Cache knobs a schedule search runs with, one search and one line each ('': the plain form)")
    parser.add_argument("--schedule-prompts", type=int, default=6,
                        help="calibration (training) captions the schedules are searched on")
    parser.add_argument("--out", default=None, help="JSON path (default out/frontier_<model>.json)")
    parser.add_argument("--docs", default="docs", help="folder for frontier_<model>.md/.png ('' to skip)")
    args = parser.parse_args()
    args.steps = args.steps or (28 if args.model == "shapes-flux" else 20)
    args.prompts = args.prompts or (6 if args.model == "shapes-flux" else 2)
    report = run(args)
    out = Path(args.out or ROOT / f"out/frontier_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    text = markdown(report)
    if args.docs:
        docs = Path(args.docs)
        (docs / f"frontier_{args.model}.md").write_text(text)
        plot(report, docs / f"frontier_{args.model}.png")
    print(text)
    print(f"wrote {out}" + (f", {args.docs}/frontier_{args.model}.md/.png" if args.docs else ""))


if __name__ == "__main__":
    main()
