"""TODO: the tiny Wan 2.2 builders."""

from __future__ import annotations


def build_tiny_wan22(seed: int = 0):
    raise NotImplementedError("build_tiny_wan22")


def build_tiny_wan22_i2v(seed: int = 0):
    raise NotImplementedError("build_tiny_wan22_i2v")
