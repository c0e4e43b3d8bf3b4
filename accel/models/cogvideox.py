"""TODO: the tiny cogvideox builder."""

from __future__ import annotations


def build_tiny_cogvideox(seed: int = 0):
    raise NotImplementedError("build_tiny_cogvideox")
