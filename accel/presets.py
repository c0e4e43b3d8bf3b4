"""Named specs. Presets are data: each maps to a list of method specs exactly as a user could write them.

The server maps the OpenAI `quality` field (low|medium|high|auto) onto these names through `QUALITY_TO_PRESET`.
"""

from __future__ import annotations

PRESETS: dict[str, list[dict]] = {
    "off": [],
    "quality": [{"method": "fbcache", "threshold": 0.03}],
    "balanced": [{"method": "fbcache", "threshold": 0.08}],
    "fast": [{"method": "fbcache", "threshold": 0.15}],
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "off": "no acceleration: bit-identical to the plain pipeline",
    "quality": "light caching, output close to the plain pipeline",
    "balanced": "moderate caching",
    "fast": "aggressive caching, most speed, lowest fidelity",
}

QUALITY_TO_PRESET: dict[str, str] = {"high": "quality", "medium": "balanced", "low": "fast", "auto": "balanced"}
