"""TODO: the tiny pixart builder."""

from __future__ import annotations


def build_tiny_pixart(seed: int = 0):
    raise NotImplementedError("build_tiny_pixart")
