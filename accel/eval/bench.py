"""`accel bench`: baseline and every spec on the same prompts and seeds, interleaved, in one process.

For each (prompt, seed) case the baseline and each spec run back to back, in a rotating order, so that machine
noise hits all of them alike; a spec's time ratio is the median over cases and repeats of its time divided by
the baseline's time in the same round. Work counts (block forwards computed) are exact. Writes
`report.json`, `report.md` and `grid.png` (baseline and each spec side by side).
"""

from __future__ import annotations

import json
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from accel.eval.metrics import fidelity
from accel.generate import GenerationParams, GenerationResult, generate
from accel.errors import SpecError
from accel.spec import parse_spec

BASELINE = "baseline"


@dataclass
class BenchCase:
    prompt: str
    seed: int


@dataclass
class SpecRun:
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    latent_mad: list[float] = field(default_factory=list)
    block_fraction: list[float] = field(default_factory=list)
    adherence: list[float] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)


def _label(spec: Any) -> str:
    configs = parse_spec(spec)
    return " + ".join(c.shorthand() for c in configs) or "off"


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v == v]  # drop NaN
    return float(statistics.median(values)) if values else None


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else None


def run_bench(
    pipe: Any,
    specs: list[Any],
    cases: list[BenchCase],
    *,
    params: dict[str, Any] | None = None,
    repeats: int = 1,
    warmup: bool = True,
    out_dir: str | Path | None = None,
    adherence: Callable[[np.ndarray, str], float] | None = None,
    model_name: str | None = None,
    progress: bool = True,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Benchmark `specs` against the baseline; return the report dict (also written to `out_dir`). `inputs`: request
    fields that are not JSON (input images), given to every run and left out of the report."""
    params = dict(params or {})
    inputs = dict(inputs or {})
    labels = [_label(s) for s in specs]
    if len(set(labels)) != len(labels):
        raise SpecError("bench: the same spec is given twice: " + ", ".join(sorted({l for l in labels if labels.count(l) > 1})))
    runs = {label: SpecRun() for label in [BASELINE, *labels]}
    grid_rows: list[list[np.ndarray]] = []
    names = [BASELINE, *labels]
    spec_of = {BASELINE: None, **dict(zip(labels, specs))}

    def run(label: str, case: BenchCase) -> GenerationResult:
        request = GenerationParams.parse(prompt=case.prompt, seed=case.seed, **params, **inputs)
        return generate(pipe, request, spec_of[label])

    if warmup and cases:  # first calls pay one-time costs (allocations, compilation) for everyone
        for label in names:
            run(label, cases[0])
    total = len(cases) * repeats * len(names)
    bar = tqdm(total=total, desc="bench", disable=not progress, unit="run")
    for case_index, case in enumerate(cases):
        results: dict[str, GenerationResult] = {}
        for repeat in range(repeats):
            order = names[(case_index + repeat) % len(names):] + names[: (case_index + repeat) % len(names)]
            round_times: dict[str, float] = {}
            for label in order:
                result = run(label, case)
                round_times[label] = result.seconds
                results.setdefault(label, result)
                bar.update(1)
            for label in names:
                runs[label].times.append(round_times[label])
                runs[label].ratios.append(round_times[label] / round_times[BASELINE])
        baseline_result = results[BASELINE]
        row = []
        for label in names:
            result = results[label]
            metrics = fidelity(baseline_result.frames(), result.frames(), baseline_result.latents, result.latents)
            runs[label].psnr.append(metrics["psnr"])
            runs[label].ssim.append(metrics["ssim"])
            runs[label].latent_mad.append(metrics["latent_mad"])
            runs[label].block_fraction.append(result.report["block_fraction_computed"])
            runs[label].reports.append(result.report)
            if adherence is not None:
                runs[label].adherence.append(float(np.mean([adherence(f, case.prompt) for f in result.frames()])))
            frames = result.frames()
            row.append(frames[len(frames) // 2])
        grid_rows.append(row)
    bar.close()

    summary = []
    for label in names:
        r = runs[label]
        ratio = _median(r.ratios)
        summary.append(
            {
                "spec": label,
                "time_ratio": ratio,
                "speedup": (1.0 / ratio) if ratio else None,
                "median_seconds": _median(r.times),
                "block_fraction_computed": _mean(r.block_fraction),
                "psnr": _mean(r.psnr),
                "ssim": _mean(r.ssim),
                "latent_mad": _mean(r.latent_mad),
                "adherence": _mean(r.adherence) if adherence is not None else None,
                "extra_forwards": _mean([rep["extra_forwards"] for rep in r.reports]),
            }
        )
    report = {
        "model": model_name or getattr(pipe, "accel_source", type(pipe).__name__),
        "device": _device_name(pipe),
        "params": params,
        "cases": [case.__dict__ for case in cases],
        "repeats": repeats,
        "results": summary,
        "per_case": {label: {"ratios": runs[label].ratios, "psnr": runs[label].psnr} for label in names},
    }
    if out_dir is not None:
        write_report(report, grid_rows, names, Path(out_dir))
    return report


def _device_name(pipe: Any) -> str:
    device = pipe.transformer.device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        f"Model `{report['model']}` on {report['device']}; {len(report['cases'])} case(s) x {report['repeats']} "
        f"repeat(s); params {json.dumps(report['params'])}.",
        "",
        "| spec | speedup | time ratio | blocks computed | PSNR (dB) | SSIM | latent MAD | adherence |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        lines.append(
            f"| `{row['spec']}` | {_fmt(row['speedup'], 2)}x | {_fmt(row['time_ratio'])} | "
            f"{_fmt(row['block_fraction_computed'])} | {_fmt(row['psnr'], 2)} | {_fmt(row['ssim'])} | "
            f"{_fmt(row['latent_mad'], 4)} | {_fmt(row['adherence'])} |"
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], grid_rows: list[list[np.ndarray]], names: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_table(report))
    save_grid(grid_rows, out / "grid.png")


def save_grid(rows: list[list[np.ndarray]], path: Path, pad: int = 4) -> None:
    """Rows of (H, W, 3) float images -> one PNG with white padding."""
    if not rows:
        return
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    canvas = np.ones((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = image
    Image.fromarray((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)).save(path)
