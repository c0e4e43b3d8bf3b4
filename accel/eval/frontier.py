"""What the caching frontier and the calibration share: work counted outside the methods, and Pareto sets.

Work is counted with a forward pre-hook on every attention's query projection (`to_q`) of the pipeline's
transformers, so a block, an attention or a whole step that any cache skips (ours, diffusers', cache-dit's) makes
none: the same count for every method, whatever it reports itself. `scripts/bench_frontier.py` and
`accel.calibration.calibrate` both use it.
"""

from __future__ import annotations

from typing import Any, Callable


class AttentionCounter:
    """Counts attention computations: a forward pre-hook on every `to_q` of the pipeline's transformers."""

    def __init__(self, pipe: Any):
        self.count = 0
        self.handles = []
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe, name, None)
            if model is None:
                continue
            for module_name, module in model.named_modules():
                if module_name.split(".")[-1] == "to_q":
                    self.handles.append(module.register_forward_pre_hook(self._hit))
        if not self.handles:
            raise ValueError("no attention query projection (to_q) found to count work on")

    def _hit(self, *_):
        self.count += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def pareto(points: list[dict], work: str = "work", quality: str = "psnr",
           key: Callable[[dict], Any] | None = None) -> list[dict]:
    """Points no other point beats on both `work` (lower) and `quality` (higher), by increasing work and quality."""
    front = []
    for p in sorted(points, key=key or (lambda p: (p[work], -p[quality]))):
        if not front or p[quality] > front[-1][quality]:
            front.append(p)
    return front
