"""Calibrated AB-Cache schedules: which k steps of a call to compute, searched once per model and step count.

AB-Cache computes every `interval`-th step; where a model's outputs bend (the first steps, the end of the schedule)
evenly spaced refreshes are too sparse and elsewhere too dense. As MagCache calibrates its ratios once per model,
this searches, for each budget k, the k computed steps that maximise the mean PSNR of AB-Cache's output against the
plain output over calibration prompts (real pipeline runs, so what it measures is what a request gets). Budgets are
searched in increasing order; each starts from the better of evenly spaced steps and the previous budget's schedule
with the one step added that helps most (always step 0 first), then moves one step at a time by up to `reach` while
the mean PSNR rises by more than `min_gain` dB: coordinate ascent, a few dozen runs per budget. The result is a spec per budget,
`abcache:steps=[...]`, valid at that step count; prompts outside the calibration set are the test of it
(`scripts/bench_frontier.py` searches on training captions and measures on held-out ones).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from accel.eval.metrics import psnr


def evenly_spaced(budget: int, steps: int) -> list[int]:
    return sorted({round(i * steps / budget) for i in range(budget)})


def schedule_spec(schedule: list[int], order: int = 2, knobs: str = "") -> str:
    """The AB-Cache spec computing `schedule`, with other AB-Cache `knobs` ("correct=true,...") appended."""
    return f"abcache:order={order},steps=[{','.join(map(str, schedule))}]" + (f",{knobs}" if knobs else "")


def search_schedule(score: Callable[[list[int]], float], budget: int, steps: int, reach: int = 3,
                    min_gain: float = 0.05, previous: list[int] | None = None) -> tuple[list[int], float]:
    """(schedule, score) for one budget: coordinate ascent from the better of evenly spaced steps and `previous`
    (a schedule of budget - 1) plus its best added step; `score(schedule)` is the mean PSNR of AB-Cache with that
    schedule (step 0 stays first: a call's first output has nothing to extrapolate)."""
    starts = [evenly_spaced(budget, steps)]
    if previous is not None and len(previous) == budget - 1:
        starts += [sorted(previous + [s]) for s in range(1, steps) if s not in previous]
    best, value = max(((start, score(start)) for start in starts), key=lambda pair: pair[1])  # each scored once
    improved = True
    while improved:
        improved = False
        for index in range(1, len(best)):
            for move in [d for r in range(1, reach + 1) for d in (-r, r)]:
                candidate = list(best)
                candidate[index] += move
                low = candidate[index - 1]
                high = candidate[index + 1] if index + 1 < len(candidate) else steps
                if not low < candidate[index] < high:
                    continue
                result = score(candidate)
                if result > value + min_gain:
                    best, value, improved = candidate, result, True
    return best, value


def calibrate_schedules(pipe: Any, prompts: list[str], steps: int, budgets: list[int], seed: int = 0,
                        order: int = 2, knobs: str = "") -> dict[int, tuple[str, float]]:
    """{budget: (spec, mean PSNR on the calibration prompts)} for `pipe` at `steps` steps (its default size), for
    AB-Cache with these other `knobs` (a schedule suits the predictor it was searched with: with `correct=true` longer
    gaps pay)."""
    from accel.generate import GenerationParams, generate

    def run(prompt: str, spec: str | None) -> np.ndarray:
        return generate(pipe, GenerationParams.parse(prompt=prompt, seed=seed, num_inference_steps=steps), spec).images

    plain = {prompt: run(prompt, None) for prompt in prompts}

    def score(schedule: list[int]) -> float:
        spec = schedule_spec(schedule, order, knobs)
        return float(np.mean([psnr(plain[p], run(p, spec)) for p in prompts]))

    found, schedule = {}, None
    for budget in range(min(budgets), max(budgets) + 1):  # every budget in between seeds the next one
        schedule, value = search_schedule(score, budget, steps, previous=schedule)
        if budget in budgets:
            found[budget] = (schedule_spec(schedule, order, knobs), value)
    return found
