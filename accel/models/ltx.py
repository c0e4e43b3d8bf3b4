"""TODO: the tiny ltx builder."""

from __future__ import annotations


def build_tiny_ltx(seed: int = 0):
    raise NotImplementedError("build_tiny_ltx")
