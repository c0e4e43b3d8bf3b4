"""`accel calibrate`: sweep every caching method's main knob on calibration prompts and keep what it measured.

For each prompt the plain output is computed first, then every setting of the sweep runs on the same prompt and
seed, in an order that rotates per prompt, with a fresh plain run for timing every `plain_every` settings (the
time ratio of a run is over the nearest plain run's, so machine noise hits both alike). Per setting and prompt it
records the exact work fraction (attention computations counted on every `to_q`, outside the methods:
`accel.eval.frontier.AttentionCounter`), the time ratio, PSNR and SSIM against the plain output, prompt adherence
where the shapes scorer applies, and the online error the fidelity estimate reads (`accel.calibration.estimate`).
The profile keeps, per setting, the work, the speedup (median over prompts), the PSNR per prompt with its median
and 10th percentile, and the Pareto front (less work, higher 10th-percentile PSNR); the estimator is fitted on all
runs.

Resumable and Ctrl-C safe: every finished run is added to a state file next to the output (`<out>.progress.json`,
written atomically), which a second run of the same calibration (same model, prompts, steps, sweep) picks up;
the profile itself is written (atomically) only when every run is done, and the state file is then removed. An
interrupted calibration never leaves a partial profile.
"""

from __future__ import annotations

import datetime
import platform
import statistics
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from accel.calibration.estimate import estimate_key, fit_estimator, recording
from accel.calibration.profile import (
    Bucket,
    Profile,
    ProfileError,
    SettingStats,
    adapters_hash,
    atomic_write_json,
    fingerprint,
    save_profile,
)
from accel.eval.frontier import AttentionCounter, pareto
from accel.eval.metrics import psnr, ssim
from accel.methods import METHODS
from accel.spec import parse_spec

STATE_FORMAT = "accel-calibration-state/1"
RANDOM_NOTE = "random weights"  # the note of a profile calibrated on a random-weight model

# prompts for models without a grammar of their own (tiny random models only need a few)
GENERIC_PROMPTS = [
    "a red circle on the left", "a lighthouse on a cliff at sunset", "a bowl of fruit on a wooden table",
    "a cat asleep on a blue sofa", "a city street in the rain at night", "a mountain lake with pine trees",
    "a portrait of an old sailor", "a green triangle in the center",
]


def default_prompts(model: str | None, count: int) -> list[str]:
    """Calibration prompts: for shapes-flux, captions of training triples only (one or two shapes, alternating),
    so the held-out captions stay unseen by calibration; else generic prompts."""
    if model == "shapes-flux":
        from accel.eval.shapes_captions import TRAIN_TRIPLES, make_caption

        triples = sorted(TRAIN_TRIPLES)
        rng = np.random.default_rng(1234)
        prompts = []
        for i in range(count):
            picks = rng.choice(len(triples), size=1 if i % 2 == 0 else 2, replace=False)
            chosen = [triples[p] for p in picks]
            if len(chosen) == 2 and chosen[0][2] == chosen[1][2]:  # two shapes at one position: draw again
                chosen = [chosen[0], next(t for t in triples if t[2] != chosen[0][2])]
            prompts.append(make_caption(chosen))
        return prompts
    return (GENERIC_PROMPTS * (count // len(GENERIC_PROMPTS) + 1))[:count]


def default_sweep(pipe: Any) -> list[tuple[str, str]]:
    """(line, spec) of every setting: each caching method's main knob, where the model's family supports it."""
    from accel.adapters import adapter_for
    from accel.caching.abcache import euler_steps

    family = adapter_for(pipe).family
    rows = [("abcache_adaptive", f"abcache_adaptive:tolerance={t}")
            for t in (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3)]
    if euler_steps(pipe.scheduler):  # with the corrector (docs/accelerators.md), on FlowMatch Euler schedulers
        rows += [("abcache_adaptive corrected", f"abcache_adaptive:tolerance={t},correct=true")
                 for t in (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3)]
        rows += [("abcache_adaptive corrected", f"abcache_adaptive:tolerance={t},estimate=higher,correct=true")
                 for t in (0.03, 0.05, 0.07)]
    rows += [("abcache", f"abcache:interval={n},order={o}") for o in (1, 2) for n in (2, 3, 4, 6)]
    rows += [("sortblock", f"sortblock:K={k},beta={b}") for k in (3, 5, 8) for b in (0.1, 0.3)]
    rows += [("taylorseer", f"taylorseer:cache_interval={n}") for n in (2, 3, 4, 6)]
    rows += [("fbcache", f"fbcache:threshold={t}") for t in (0.05, 0.1, 0.2, 0.3)]
    return [(line, spec) for line, spec in rows
            if METHODS[line.split()[0]].families is None or family in METHODS[line.split()[0]].families]


def state_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".progress.json")


def _input_image(info: Any) -> Any:
    """A fixed smooth colour image at the model's size, for models that need one (edits, image-to-video)."""
    from PIL import Image

    width = info.defaults.width or info.size_multiple * 8
    height = info.defaults.height or info.size_multiple * 8
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0 * x], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def _p10(values: list[float]) -> float:
    return float(np.percentile(values, 10))


def calibrate(
    pipe: Any,
    out: str | Path,
    *,
    model: str | None = None,
    prompts: list[str] | None = None,
    steps: int | None = None,
    seed: int = 0,
    sweep: list[tuple[str, str]] | None = None,
    plain_every: int = 6,
    random_weights: bool | None = None,
    command: str = "",
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    lora: list[Any] | None = None,
) -> Profile:
    """Calibrate `pipe` at its default size (`steps`: the model's default), write the profile to `out` and return
    it; resumes from `<out>.progress.json` when a previous run of the same calibration was interrupted. `lora`
    (adapters the model was loaded with, as a request names them): every run uses that set, and the profile is the
    one requests with exactly that set get (`accel.calibration.profile.profile_for`)."""
    from accel.generate import GenerationParams, generate, model_info, resolve_params
    from accel.models.registry import RANDOM_MODELS

    model = model or getattr(pipe, "accel_source", None) or type(pipe).__name__
    info = model_info(pipe)
    prompts = prompts or default_prompts(model, 8 if model == "shapes-flux" else 2)
    sweep = sweep or default_sweep(pipe)
    for _, spec in sweep:
        parse_spec(spec)  # every spec validates before the first run
    images = [_input_image(info)] if info.needs_image else []
    base = resolve_params(pipe, GenerationParams.parse(prompt=prompts[0], seed=seed, num_inference_steps=steps,
                                                       images=images, lora=lora or []))
    setup = {"model": model, "prompts": prompts, "steps": base.num_inference_steps, "seed": seed,
             "height": base.height, "width": base.width, "frames": base.num_frames,
             "sweep": [spec for _, spec in sweep], "lora": [ref.model_dump() for ref in base.lora],
             "lora_weights": adapters_hash(pipe, [ref.name for ref in base.lora]) if base.lora else None}
    mark = fingerprint(pipe)
    state = _load_state(out, mark.model_dump(), setup)
    runs: dict[str, dict[str, dict]] = state["runs"]
    total = len(prompts) * len(sweep)
    done = sum(len(v) for v in runs.values())
    counter = AttentionCounter(pipe)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=done, desc=f"calibrating {model}", unit="run")
    try:
        pipe.set_progress_bar_config(disable=True)

        def run(prompt: str, spec: str | None) -> tuple[np.ndarray, int, float, list[dict]]:
            params = GenerationParams.parse(prompt=prompt, seed=seed, num_inference_steps=setup["steps"],
                                            images=images, lora=setup["lora"])
            counter.count = 0
            with recording() as records:
                result = generate(pipe, params, spec)
            return result.frames(), counter.count, result.seconds, records

        scorer = _adherence_scorer(prompts)
        if done < total:
            run(prompts[0], None)  # one-time costs
        for i, prompt in enumerate(prompts):
            mine = runs.setdefault(str(i), {})
            if len(mine) == len(sweep):
                continue
            plain, plain_work, plain_seconds, _ = run(prompt, None)
            state["plain_adherence"][str(i)] = scorer(plain, prompt) if scorer else None
            order = sweep[i % len(sweep):] + sweep[: i % len(sweep)]
            since_plain = 0
            for line, spec in order:
                if spec in mine:
                    continue
                if since_plain and since_plain % plain_every == 0:
                    _, _, plain_seconds, _ = run(prompt, None)
                since_plain += 1
                frames, work, seconds, records = run(prompt, spec)
                error = max(records[-1]["error"]) if records and records[-1]["error"] else 0.0
                mine[spec] = {"work": work / max(plain_work, 1), "time_ratio": seconds / plain_seconds,
                              "psnr": psnr(plain, frames), "ssim": ssim(plain, frames),
                              "adherence": scorer(frames, prompt) if scorer else None, "error": error}
                atomic_write_json(state_path(out), state)
                done += 1
                if bar is not None:
                    bar.update(1)
                if on_progress is not None:
                    on_progress(done, total)
    finally:
        counter.remove()
        if bar is not None:
            bar.close()
    profile = _profile(pipe, model, mark, setup, sweep, state, random_weights if random_weights is not None
                       else model in RANDOM_MODELS, command)
    save_profile(profile, out)
    state_path(out).unlink(missing_ok=True)
    return profile


def _load_state(out: str | Path, mark: dict, setup: dict) -> dict:
    path = state_path(out)
    fresh = {"format": STATE_FORMAT, "fingerprint": mark, "setup": setup, "runs": {}, "plain_adherence": {}}
    if not path.is_file():
        return fresh
    import json

    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ProfileError(f"calibration state {path}: unreadable ({exc}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ProfileError(f"calibration state {path}: not a calibration state file; delete it to start over")
    if state.get("fingerprint") != mark or state.get("setup") != setup:
        raise ProfileError(f"calibration state {path} is for another calibration (other model, prompts, steps or "
                           "sweep); delete it to start over, or repeat that calibration's command to resume it")
    return state


def _adherence_scorer(prompts: list[str]) -> Callable[[np.ndarray, str], float] | None:
    """Fraction of outputs whose caption the shapes scorer finds fully right, when every prompt is in its grammar."""
    from accel.eval.shapes_captions import parse_caption
    from accel.eval.shapes_scorer import score

    try:
        for prompt in prompts:
            parse_caption(prompt, extended=True)  # also the built-in adapters' words (star)
    except ValueError:
        return None
    return lambda frames, prompt: float(np.mean([score(frame, prompt).all_correct for frame in frames]))


def _profile(pipe: Any, model: str, mark: Any, setup: dict, sweep: list[tuple[str, str]], state: dict, random_weights: bool,
             command: str) -> Profile:
    runs = state["runs"]
    settings, samples = [], []
    for line, spec in sweep:
        rows = [runs[str(i)][spec] for i in range(len(setup["prompts"]))]
        values = [r["psnr"] for r in rows]
        adherence = [r["adherence"] for r in rows if r["adherence"] is not None]
        settings.append(SettingStats(
            line=line, spec=spec, work=float(np.mean([r["work"] for r in rows])),
            speedup=1.0 / float(statistics.median(r["time_ratio"] for r in rows)),
            psnr=[round(v, 3) for v in values], psnr_median=float(statistics.median(values)), psnr_p10=_p10(values),
            ssim_median=float(statistics.median(r["ssim"] for r in rows)),
            adherence=float(np.mean(adherence)) if adherence else None,
            error=[float(f"{r['error']:.4g}") for r in rows]))
        method = estimate_key(parse_spec(spec), pipe)
        samples += [(method, r["error"], r["psnr"]) for r in rows]
    points = [{"spec": s.spec, "work": s.work, "psnr": s.psnr_p10} for s in settings]
    front = [p["spec"] for p in pareto(points)]
    plain = [v for v in state["plain_adherence"].values() if v is not None]
    bucket = Bucket(height=setup["height"], width=setup["width"], frames=setup["frames"], steps=setup["steps"],
                    prompts=setup["prompts"], seed=setup["seed"],
                    plain_adherence=float(np.mean(plain)) if plain else None,
                    settings=settings, front=front)
    device = (f"cpu ({platform.machine()}, {torch.get_num_threads()} thread(s))" if not torch.cuda.is_available()
              else torch.cuda.get_device_name(0))
    return Profile(model=model, fingerprint=mark, random_weights=random_weights,
                   note=RANDOM_NOTE if random_weights else "", command=command, device=device,
                   created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   buckets=[bucket], estimator=fit_estimator(samples), lora=setup.get("lora", []),
                   lora_weights=setup.get("lora_weights"))
