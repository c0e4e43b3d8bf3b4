"""Named specs. Presets are data: each maps to a list of method specs exactly as a user could write them.

The server maps the OpenAI `quality` field (low|medium|high|auto) onto these names through `QUALITY_TO_PRESET`.
"""

from __future__ import annotations

# Chosen from the sweep on the trained reference model (docs/benchmarks.md, shapes-flux, 28 steps, CPU):
# quality 1.41x at 49.7 dB, balanced 2.45x at 40.2 dB, fast 2.61x at 37.0 dB (fewest block forwards: 32%); all
# three keep the un-accelerated prompt adherence (0.875 on 32 held-out captions).
PRESETS: dict[str, list[dict]] = {
    "off": [],
    "quality": [{"method": "sortblock", "K": 3, "beta": 0.1}],
    "balanced": [{"method": "abcache", "interval": 4}],
    "fast": [{"method": "abcache"}],
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "off": "no acceleration: bit-identical to the plain pipeline",
    "quality": "Sortblock, full step every 3: output closest to the plain pipeline",
    "balanced": "AB-Cache computing every 4th step after a 5-step warm-up",
    "fast": "AB-Cache with the authors' schedule (every 6th step): fewest block forwards",
}

QUALITY_TO_PRESET: dict[str, str] = {"high": "quality", "medium": "balanced", "low": "fast", "auto": "balanced"}
