"""Headless Locust runs with reports.

    python -m loadtests --host http://127.0.0.1:8000 --users 8 --spawn-rate 8 --duration 30s --out out/load
    python -m loadtests ... --rate 4                       # open loop: about 4 requests/s in total
    python -m loadtests ... --compare-acceleration off,balanced   # same load per spec, ratios in the report

Each run starts Locust as a subprocess (`locust --headless`), records every request (time, latency, status) in
JSONL through the locustfile, and scrapes the server's `/metrics` before and after for its own queue-time and
batch-size figures. Writes `report.json`, `report.md` and `latency.png` to `--out`. Exit status 1 when any request
got a 5xx or no response, or was lost (started but never finished).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (e.g. 30s, 2m)")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


# -- /metrics ----------------------------------------------------------------------------------------------------
def scrape(host: str, headers: dict) -> dict[str, float]:
    """Prometheus text format as {'name{labels}': value} (enough for counters, gauges and histograms)."""
    text = httpx.get(host.rstrip("/") + "/metrics", headers=headers, timeout=10).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                samples[key] = float(value)
            except ValueError:
                pass
    return samples


def _histogram(before: dict, after: dict, name: str) -> dict:
    """Count, mean and bucket-interpolated p50/p95 of a histogram's observations between two scrapes."""
    delta = lambda key: after.get(key, 0.0) - before.get(key, 0.0)  # noqa: E731
    count, total = delta(f"{name}_count"), delta(f"{name}_sum")
    buckets = sorted(((float("inf") if m.group(1) == "+Inf" else float(m.group(1))), delta(k))
                     for k in after if (m := re.fullmatch(rf'{name}_bucket\{{le="([^"]+)"\}}', k)))
    out = {"count": count, "mean": total / count if count else None}
    for q in (0.5, 0.95):
        out[f"p{int(q * 100)}"] = None
        if count:
            previous_le, previous_n = 0.0, 0.0
            for le, n in buckets:
                if n >= q * count:
                    if math.isinf(le):
                        out[f"p{int(q * 100)}"] = previous_le
                    else:
                        fraction = (q * count - previous_n) / max(n - previous_n, 1e-9)
                        out[f"p{int(q * 100)}"] = previous_le + fraction * (le - previous_le)
                    break
                previous_le, previous_n = le, n
    return out


def server_figures(before: dict, after: dict) -> dict:
    errors = {k: after[k] - before.get(k, 0.0) for k in after
              if k.startswith("accel_errors_total") and after[k] - before.get(k, 0.0)}
    return {"queue_seconds": _histogram(before, after, "accel_queue_seconds"),
            "batch_size": _histogram(before, after, "accel_batch_size"),
            "rejected": after.get("accel_rejected_total", 0.0) - before.get("accel_rejected_total", 0.0),
            "errors": errors}


# -- one run -----------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def run_once(args, out: Path, label: str, accel: str | None) -> dict:
    records_path = out / f"requests-{label}.jsonl"
    records_path.unlink(missing_ok=True)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    env = {**os.environ, "LOADTEST_RECORDS": str(records_path), "LOADTEST_USERS": str(args.users),
           "LOADTEST_RATE": str(args.rate or 0), "LOADTEST_SCENARIOS": args.scenarios,
           "LOADTEST_STEPS": str(args.steps)}
    if accel is not None:
        env["LOADTEST_ACCEL"] = accel
    if args.api_key:
        env["LOADTEST_API_KEY"] = args.api_key
    for key, value in (("LOADTEST_IMAGE_MODEL", args.image_model), ("LOADTEST_VIDEO_MODEL", args.video_model),
                       ("LOADTEST_SIZES", args.sizes)):
        if value:
            env[key] = value
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", args.host,
               "--users", str(args.users), "--spawn-rate", str(args.spawn_rate), "--run-time", f"{args.duration:g}s",
               "--stop-timeout", str(int(args.stop_timeout)), "--only-summary", "--loglevel", "WARNING",
               "--exit-code-on-error", "0"]
    before = scrape(args.host, headers)
    start = time.time()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.time() - start
    after = scrape(args.host, headers)
    if completed.returncode != 0:
        raise SystemExit(f"locust failed ({completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    lines = [json.loads(line) for line in records_path.read_text().splitlines() if line.strip()]
    summary = next((l for l in lines if l.get("summary")), {"started": None, "finished": None})
    plan = next((l for l in lines if "skipped" in l), {"scenarios": None, "skipped": {}})
    records = [l for l in lines if not l.get("summary") and "skipped" not in l]
    by_status: dict[str, int] = {}
    for r in records:
        by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
    stopped = summary.get("stopped") or 0  # killed by Locust at the end of the run, mid-request
    lost = (summary["started"] - summary["finished"] - stopped) if summary["started"] is not None else None
    lost = (lost or 0) + sum(1 for r in records if r["name"] == "videos:lost")
    generation = [r for r in records if r["name"] in ("images", "videos:create")]
    images = [r["ms"] for r in records if r["name"] == "images" and r["status"] == 200]
    span = (max(r["t"] + r["ms"] / 1000 for r in records) - min(r["t"] for r in records)) if records else 0.0
    ok_images = len(images)
    videos_done = sum(1 for r in records if r["name"] == "videos:content" and r["status"] == 200)
    result = {
        "label": label, "acceleration": accel, "scenarios": plan["scenarios"], "skipped": plan["skipped"],
        "users": args.users, "spawn_rate": args.spawn_rate,
        "duration_s": args.duration, "rate": args.rate, "wall_s": round(wall, 2),
        "requests": len(records), "generation_requests": len(generation),
        "req_per_s": round(len(records) / span, 3) if span else 0.0,
        "images_per_s": round(ok_images / span, 3) if span else 0.0,
        "videos_completed": videos_done,
        "image_latency_ms": {f"p{q}": percentile(images, q / 100) for q in (50, 95, 99)},
        "status_counts": by_status,
        "server_errors": sum(n for s, n in by_status.items() if s.startswith("5")),
        "no_response": by_status.get("0", 0),
        "lost": lost,
        "stopped_at_end": stopped,
        "server": server_figures(before, after),
    }
    result["ok"] = result["server_errors"] == 0 and result["no_response"] == 0 and result["lost"] == 0
    result["_records"] = records
    return result


# -- reports -----------------------------------------------------------------------------------------------------
def _fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def write_reports(results: list[dict], out: Path, args) -> dict:
    runs = [{k: v for k, v in r.items() if k != "_records"} for r in results]
    report = {"host": args.host, "scenarios": args.scenarios, "runs": runs}
    if len(runs) > 1:
        base = runs[0]
        report["comparison"] = [
            {"acceleration": r["acceleration"], "vs": base["acceleration"],
             "images_per_s_ratio": (r["images_per_s"] / base["images_per_s"]) if base["images_per_s"] else None,
             "p50_ratio": (r["image_latency_ms"]["p50"] / base["image_latency_ms"]["p50"])
             if r["image_latency_ms"]["p50"] and base["image_latency_ms"]["p50"] else None}
            for r in runs[1:]]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Load test: {args.host}", "",
             f"Scenarios `{args.scenarios}`, {args.users} users, spawn rate {args.spawn_rate}/s, {args.duration:g} s"
             + (f", open loop at {args.rate} req/s" if args.rate else ", closed loop") + ".", "",
             "| run | accel | req/s | images/s | image p50 ms | p95 | p99 | videos | 5xx | no response | lost "
             "| queue mean ms | queue p95 ms | batch mean | statuses |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lat, srv = r["image_latency_ms"], r["server"]
        q = srv["queue_seconds"]
        lines.append(
            f"| {r['label']} | {r['acceleration'] or 'mix'} | {r['req_per_s']:.2f} | {r['images_per_s']:.2f} "
            f"| {_fmt(lat['p50'], 0)} | {_fmt(lat['p95'], 0)} | {_fmt(lat['p99'], 0)} | {r['videos_completed']} "
            f"| {r['server_errors']} | {r['no_response']} | {r['lost']} "
            f"| {_fmt(q['mean'] * 1000 if q['mean'] is not None else None, 1)} "
            f"| {_fmt(q['p95'] * 1000 if q['p95'] is not None else None, 1)} | {_fmt(srv['batch_size']['mean'], 2)} "
            f"| {json.dumps(r['status_counts'])} |")
    skipped = {name: why for r in runs for name, why in r["skipped"].items()}
    if skipped:
        lines += [""] + [f"Skipped scenario `{name}`: {why}." for name, why in skipped.items()]
    for c in report.get("comparison", []):
        lines += ["", f"`{c['acceleration']}` vs `{c['vs']}`: images/s x{_fmt(c['images_per_s_ratio'], 2)}, "
                      f"image p50 x{_fmt(c['p50_ratio'], 2)}"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(results, out / "latency.png")
    return report


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        records = [x for x in r["_records"] if x["name"] in ("images", "videos:create")]
        if not records:
            continue
        t0 = min(x["t"] for x in records)
        ax.scatter([x["t"] - t0 for x in records], [x["ms"] for x in records], s=6,
                   label=f"{r['label']} ({r['acceleration'] or 'mix'})")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("latency (ms)")
    ax.set_title("request latency over time")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--spawn-rate", type=float, default=4.0)
    parser.add_argument("--duration", type=parse_duration, default=30.0, help="e.g. 30s, 2m")
    parser.add_argument("--rate", type=float, default=None, help="open loop: total requests/s (paced users)")
    parser.add_argument("--out", type=Path, default=Path("out/loadtest"))
    parser.add_argument("--compare-acceleration", default=None,
                        help="comma-separated specs run one after the other with the same load (first = baseline)")
    parser.add_argument("--scenarios", default="images,videos", help="images, videos or both")
    parser.add_argument("--steps", type=int, default=4, help="num_inference_steps per request")
    parser.add_argument("--sizes", default=None, help="image sizes, e.g. 64x64,128x128")
    parser.add_argument("--image-model", default=None)
    parser.add_argument("--video-model", default=None)
    parser.add_argument("--api-key", default=os.environ.get("LOADTEST_API_KEY"))
    parser.add_argument("--stop-timeout", type=float, default=120.0, help="seconds in-flight tasks get to finish")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    specs = args.compare_acceleration.split(",") if args.compare_acceleration else [None]
    results = [run_once(args, args.out, spec or "run", spec) for spec in specs]
    report = write_reports(results, args.out, args)
    print((args.out / "report.md").read_text())
    return 0 if all(r["ok"] for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
