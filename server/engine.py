"""The engine: owns the loaded pipelines of one device and runs one batch at a time, in a worker thread.

It speaks only to `accel` (load, generate); it never touches transformer blocks or accelerator internals.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from accel.generate import GenerationParams, GenerationResult, generate_batch
from accel.loading import load_pipeline

from server.settings import ModelSettings, ServerSettings

log = logging.getLogger("accel.server")


@dataclass
class LoadedModel:
    settings: ModelSettings
    pipe: Any
    task: str
    family: str
    load_seconds: float
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class BatchRecord:
    """What the engine ran: for tests and metrics (batch sizes, steps run, cancellations)."""

    model: str
    key: tuple
    size: int
    steps_run: int = 0
    total_steps: int = 0
    interrupted_at: int | None = None


class Engine:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.models: dict[str, LoadedModel] = {}
        self.history: list[BatchRecord] = []  # bounded: the last 1000 batches

    def load(self, on_loaded: Callable[[str, float], None] | None = None) -> None:
        from accel.adapters import adapter_for

        for model in self.settings.models:
            start = time.perf_counter()
            pipe = load_pipeline(model.source, device=self.settings.device, dtype=model.dtype, compile=model.compile,
                                 **_prune_kwargs(model))
            adapter = adapter_for(pipe)
            if self.settings.warmup:
                self._warmup(pipe)
            seconds = time.perf_counter() - start
            self.models[model.id] = LoadedModel(model, pipe, adapter.task, adapter.family, seconds)
            log.info('{"event": "model_loaded", "model": "%s", "seconds": %.2f}', model.id, seconds)
            if on_loaded:
                on_loaded(model.id, seconds)

    @staticmethod
    def _warmup(pipe: Any) -> None:
        defaults = pipe.accel_defaults
        params = GenerationParams.parse(prompt="warm-up", num_inference_steps=1, num_frames=defaults.num_frames)
        generate_batch(pipe, [params])

    def run(self, model_id: str, batch: list[GenerationParams], accel: Any,
            should_stop: Callable[[int], bool]) -> tuple[list[GenerationResult], BatchRecord]:
        """Run one batch. `should_stop(step)` is polled after every step: True interrupts the pipeline."""
        model = self.models[model_id]
        record = BatchRecord(model=model_id, key=(model_id, *_key(batch[0]), str(accel)), size=len(batch))

        def on_step(step: int, total: int) -> bool:
            record.steps_run, record.total_steps = step, total
            if should_stop(step):
                record.interrupted_at = step
                return False
            return True

        try:
            with model.lock:
                results = generate_batch(model.pipe, batch, accel, on_step=on_step)
        finally:
            self.history.append(record)
            del self.history[:-1000]
            model.pipe._interrupt = False
        return results, record

    @staticmethod
    def free_device_memory() -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _key(params: GenerationParams) -> tuple:
    from accel.generate import batch_key

    return batch_key(params)


def _prune_kwargs(model: ModelSettings) -> dict:
    """Load-time pruning, when the model settings ask for it and `accel` supports it."""
    if not model.prune_plan:
        return {}
    return {"prune_plan": model.prune_plan, "prune_ratio": model.prune_ratio}
