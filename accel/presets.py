"""Named specs. Presets are data: each maps to a list of method specs exactly as a user could write them.

The server maps the OpenAI `quality` field (low|medium|high|auto) onto these names through `QUALITY_TO_PRESET`.
"""

from __future__ import annotations

# Chosen from the caching frontier on the trained reference model (docs/benchmarks.md "Caching frontier";
# `python scripts/bench_frontier.py --model shapes-flux`: 28 steps, 6 held-out captions, work = attention computations
# counted on every to_q, CPU) and checked on its 32 held-out captions (`accel bench`, README): adaptive AB-Cache with
# the corrector where the scheduler allows it (`correct="auto"`: FlowMatch Euler; uncorrected elsewhere). On the 32
# captions quality does 33.4% of the block forwards at 51.1 dB, balanced 23.0% at 41.5 dB, fast 18.7% at 34.7 dB; the
# uncorrected presets they replace did 41.1% at 50.1 dB, 23.0% at 38.9 dB and 18.4% at 34.2 dB. None dominates
# another, and all keep the plain model's prompt adherence.
PRESETS: dict[str, list[dict]] = {
    "off": [],
    "quality": [{"method": "abcache_adaptive", "tolerance": 0.05, "estimate": "higher", "correct": "auto"}],
    "balanced": [{"method": "abcache_adaptive", "correct": "auto"}],
    "fast": [{"method": "abcache_adaptive", "tolerance": 0.15, "correct": "auto"}],
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "off": "no acceleration: bit-identical to the plain pipeline",
    "quality": "adaptive AB-Cache, tight tolerance (0.05, truncation-error estimate), corrected where the scheduler "
               "allows: output closest to the plain pipeline (shapes-flux: 33% of the work, 51 dB)",
    "balanced": "adaptive AB-Cache at its default tolerance 0.1, corrected where the scheduler allows "
                "(shapes-flux: 23% of the work, 41 dB)",
    "fast": "adaptive AB-Cache, tolerance 0.15, corrected where the scheduler allows: least work "
            "(shapes-flux: 19% of the work, 35 dB)",
}

QUALITY_TO_PRESET: dict[str, str] = {"high": "quality", "medium": "balanced", "low": "fast", "auto": "balanced"}
