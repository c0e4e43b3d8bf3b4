"""Named specs. Presets are data: each maps to a list of method specs exactly as a user could write them.

The server maps the OpenAI `quality` field (low|medium|high|auto) onto these names through `QUALITY_TO_PRESET`.
"""

from __future__ import annotations

# Chosen from the caching frontier on the trained reference model (docs/benchmarks.md "Caching frontier";
# `python scripts/bench_frontier.py --model shapes-flux`: 28 steps, 6 held-out captions, work = attention computations
# counted on every to_q, CPU): quality 41.1% of the work at 53.8 dB, balanced 22.0% at 42.1 dB, fast 19.0% at 37.3 dB.
# Each dominates the preset it replaces (sortblock K=3 61.1% at 49.9 dB; abcache interval 4 35.7% at 40.4 dB;
# abcache 32.1% at 37.3 dB), none dominates another, and on the 32 held-out captions all keep the plain model's
# prompt adherence (`accel bench`, same section).
PRESETS: dict[str, list[dict]] = {
    "off": [],
    "quality": [{"method": "abcache_adaptive", "tolerance": 0.03, "estimate": "higher"}],
    "balanced": [{"method": "abcache_adaptive"}],
    "fast": [{"method": "abcache_adaptive", "tolerance": 0.15}],
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "off": "no acceleration: bit-identical to the plain pipeline",
    "quality": "adaptive AB-Cache, tight tolerance (0.03, truncation-error estimate): output closest to the plain "
               "pipeline (shapes-flux: 41% of the work, 54 dB)",
    "balanced": "adaptive AB-Cache at its default tolerance 0.1 (shapes-flux: 22% of the work, 42 dB)",
    "fast": "adaptive AB-Cache, tolerance 0.15: least work (shapes-flux: 19% of the work, 37 dB)",
}

QUALITY_TO_PRESET: dict[str, str] = {"high": "quality", "medium": "balanced", "low": "fast", "auto": "balanced"}
