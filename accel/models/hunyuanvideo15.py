"""TODO: the tiny hunyuanvideo15 builder."""

from __future__ import annotations


def build_tiny_hunyuanvideo15(seed: int = 0):
    raise NotImplementedError("build_tiny_hunyuanvideo15")
