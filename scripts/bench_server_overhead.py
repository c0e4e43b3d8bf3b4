"""Server overhead: the same request through HTTP and as a direct library call, interleaved, one process.

    python scripts/bench_server_overhead.py --model tiny-flux --size 128 --steps 8 --n 40 --batch-wait-ms 0 --out out/overhead

Writes report.json and report.md: p50/p99 of both paths and of their per-pair difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_fixtures import LiveServer  # noqa: E402

from accel.generate import GenerationParams, generate  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--batch-wait-ms", type=float, default=0.0)
    parser.add_argument("--out", default="out/overhead")
    args = parser.parse_args()
    body = {"model": args.model, "prompt": "a red circle on the left", "size": f"{args.size}x{args.size}",
            "num_inference_steps": args.steps, "seed": 1, "acceleration": "off"}
    params = GenerationParams.parse(prompt=body["prompt"], height=args.size, width=args.size,
                                    num_inference_steps=args.steps, seed=1)
    with LiveServer(models=[{"id": args.model, "source": args.model}], max_batch_wait_ms=args.batch_wait_ms) as server:
        pipe = server.state.engine.models[args.model].pipe
        client = httpx.Client(timeout=120)
        direct, http, diffs = [], [], []
        for i in range(args.n + 5):
            start = time.perf_counter()
            generate(pipe, params)
            d = time.perf_counter() - start
            start = time.perf_counter()
            assert client.post(server.url + "/v1/images/generations", json=body).status_code == 200
            h = time.perf_counter() - start
            if i >= 5:  # warm-up
                direct.append(d * 1000), http.append(h * 1000), diffs.append((h - d) * 1000)
    report = {
        "model": args.model, "size": args.size, "steps": args.steps, "n": args.n, "batch_wait_ms": args.batch_wait_ms,
        "direct_ms": {"p50": statistics.median(direct), "p99": percentile(direct, 0.99)},
        "http_ms": {"p50": statistics.median(http), "p99": percentile(http, 0.99)},
        "overhead_ms": {"p50": statistics.median(diffs), "p99": percentile(diffs, 0.99)},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    md = (f"| path | p50 (ms) | p99 (ms) |\n|---|---|---|\n"
          f"| direct `generate()` | {report['direct_ms']['p50']:.1f} | {report['direct_ms']['p99']:.1f} |\n"
          f"| HTTP (`/v1/images/generations`, PNG + base64) | {report['http_ms']['p50']:.1f} | {report['http_ms']['p99']:.1f} |\n"
          f"| overhead (per-pair difference) | {report['overhead_ms']['p50']:.1f} | {report['overhead_ms']['p99']:.1f} |\n")
    (out / "report.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
