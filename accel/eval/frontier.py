"""What the caching frontier and the calibration share: work counted outside the methods, and Pareto sets.

Work is counted with a forward pre-hook on every attention's query projection (`to_q`) of the pipeline's
transformers, so a block, an attention or a whole step that any cache skips (ours, diffusers', cache-dit's) makes
none: the same count for every method, whatever it reports itself. `scripts/bench_frontier.py` and
`accel.calibration.calibrate` both use it; the frontier script also counts the transformers' linear-layer
multiply-accumulates (`LinearMacCounter`), the compute a method really runs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from accel.session import TRANSFORMERS


class AttentionCounter:
    """Counts attention computations: a forward pre-hook on every `to_q` of the pipeline's transformers."""

    def __init__(self, pipe: Any):
        self.count = 0
        self.handles = [module.register_forward_pre_hook(self._hit) for model in _transformers(pipe)
                        for module_name, module in model.named_modules() if module_name.split(".")[-1] == "to_q"]
        if not self.handles:
            raise ValueError("no attention query projection (to_q) found to count work on")

    def _hit(self, *_):
        self.count += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class LinearMacCounter:
    """Multiply-accumulates of every `nn.Linear` call of the transformers (projections, MLPs, modulation): the
    compute a cache really saves. A method that skips attention but still runs the MLPs (diffusers' TaylorSeer caches
    attention outputs only) does less attention work than linear work; the attention products (L^2 d) are not
    counted here, so this undercounts attention-only skipping slightly in its favour."""

    def __init__(self, pipe: Any):
        self.macs = 0
        self.handles = [module.register_forward_pre_hook(self._hit) for model in _transformers(pipe)
                        for module in model.modules() if isinstance(module, torch.nn.Linear)]

    def _hit(self, module, args):
        rows = args[0].numel() // module.in_features
        self.macs += rows * module.in_features * module.out_features


def _transformers(pipe: Any) -> list[Any]:
    return [getattr(pipe, name) for name in TRANSFORMERS if getattr(pipe, name, None) is not None]


def pareto(points: list[dict], work: str = "work", quality: str = "psnr",
           key: Callable[[dict], Any] | None = None) -> list[dict]:
    """Points no other point beats on both `work` (lower) and `quality` (higher), by increasing work and quality."""
    front = []
    for p in sorted(points, key=key or (lambda p: (p[work], -p[quality]))):
        if not front or p[quality] > front[-1][quality]:
            front.append(p)
    return front
