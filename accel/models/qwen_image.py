"""TODO: the tiny Qwen-Image builders."""

from __future__ import annotations


def build_tiny_qwen_image(seed: int = 0):
    raise NotImplementedError("build_tiny_qwen_image")


def build_tiny_qwen_image_edit(seed: int = 0):
    raise NotImplementedError("build_tiny_qwen_image_edit")
