"""TODO: the tiny zimage builder."""

from __future__ import annotations


def build_tiny_zimage(seed: int = 0):
    raise NotImplementedError("build_tiny_zimage")
