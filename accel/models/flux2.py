"""TODO: the tiny flux2 builder."""

from __future__ import annotations


def build_tiny_flux2(seed: int = 0):
    raise NotImplementedError("build_tiny_flux2")
