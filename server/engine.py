"""The engine: owns the loaded pipelines of one device and runs one batch at a time, in a worker thread.

It speaks only to `accel`'s public generate API (load, generate, model info); it never touches transformer blocks,
adapters or accelerator internals.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from accel.errors import AccelError
from PIL import Image

from accel.generate import GenerationParams, GenerationResult, ModelInfo, batch_key, generate_batch, model_info
import accel.calibration.calibrate as calibration
from accel.calibration.profile import ProfileError, attach_profile, profile_of
from accel.loading import load_pipeline
from accel.spec import AccelSpec

from server.settings import ModelSettings, ServerSettings

log = logging.getLogger("accel.server")


def work_key(model: str, params: GenerationParams, spec: AccelSpec) -> tuple:
    """Requests with equal keys can share a pipeline call: same model, same call knobs (of resolved parameters),
    the same LoRA adapter set and scales, and the same canonical spec, however it was written."""
    return (model, *batch_key(params), spec.key)


@dataclass
class LoadedModel:
    settings: ModelSettings
    pipe: Any
    info: ModelInfo
    load_seconds: float
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class BatchRecord:
    """What the engine ran for one batch (size, steps run, where it was interrupted); the scheduler hands it to
    each request of the batch."""

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
        self.calibrating: dict[str, Any] | None = None  # {"model", "done", "total"} while a model calibrates

    def load(self, on_loaded: Callable[[str, float], None] | None = None) -> None:
        for model in self.settings.models:
            start = time.perf_counter()
            try:
                pipe = load_pipeline(model.source, device=self.settings.device, dtype=model.dtype,
                                     compile=model.compile, loras=model.loras, builtin_loras=model.builtin_loras,
                                     profile=model.profile, **_prune_kwargs(model))
                self._calibration(model, pipe)
            except AccelError as exc:  # e.g. a bad plan or LoRA file: say which model's settings to fix
                raise AccelError(f"model {model.id}: {exc}", field=exc.field) from None
            info = model_info(pipe)
            if self.settings.warmup:
                generate_batch(pipe, [_warmup_params(info)])
            seconds = time.perf_counter() - start
            self.models[model.id] = LoadedModel(model, pipe, info, seconds)
            log.info('{"event": "model_loaded", "model": "%s", "seconds": %.2f}', model.id, seconds)
            if on_loaded:
                on_loaded(model.id, seconds)

    def run(self, model_id: str, batch: list[GenerationParams], spec: AccelSpec,
            should_stop: Callable[[int], bool]) -> tuple[list[GenerationResult], BatchRecord]:
        """Run one batch. `should_stop(step)` is polled after every step: True interrupts the pipeline."""
        model = self.models[model_id]
        record = BatchRecord(model=model_id, key=work_key(model_id, batch[0], spec), size=len(batch))

        def on_step(step: int, total: int) -> bool:
            record.steps_run, record.total_steps = step, total
            if should_stop(step):
                record.interrupted_at = step
                return False
            return True

        with model.lock:
            results = generate_batch(model.pipe, batch, spec, on_step=on_step)
        return results, record

    def _calibration(self, model: ModelSettings, pipe: Any) -> None:
        """A model without a fitting profile gets the one kept under `calibration_dir` (`<id>.json`), else, with
        `calibrate: true`, a new one measured now (`accel.calibration.calibrate`; resumable after a restart) and
        kept there. A kept profile of other weights is left alone (and replaced when calibrating)."""
        if profile_of(pipe) is not None or not self.settings.calibration_dir:
            return
        path = Path(self.settings.calibration_dir) / f"{model.id}.json"
        if path.is_file():
            try:
                attach_profile(pipe, path)
                return
            except ProfileError as exc:
                log.warning(json.dumps({"event": "profile_refused", "model": model.id, "error": str(exc)}))
        if not model.calibrate:
            return
        prompts = None
        if model.calibration_prompts:
            prompts = [line.strip() for line in Path(model.calibration_prompts).read_text().splitlines() if line.strip()]
        self.calibrating = {"model": model.id, "done": 0, "total": None}

        def progress(done: int, total: int) -> None:
            self.calibrating = {"model": model.id, "done": done, "total": total}

        log.info(json.dumps({"event": "calibrating", "model": model.id, "profile": str(path)}))
        try:
            profile = calibration.calibrate(pipe, path, model=model.source, prompts=prompts, progress=False, on_progress=progress,
                                command=f"server: calibrate on load ({model.id})")
        finally:
            self.calibrating = None
        attach_profile(pipe, profile)

    @staticmethod
    def free_device_memory() -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _warmup_params(info: ModelInfo) -> GenerationParams:
    """One step at the model's defaults; a grey input image for a model that needs one."""
    images = []
    if info.needs_image:
        side = info.size_multiple * 4
        images = [Image.new("RGB", (info.defaults.width or side, info.defaults.height or side), "grey")]
    return GenerationParams.parse(prompt="warm-up", num_inference_steps=1, images=images)


def _prune_kwargs(model: ModelSettings) -> dict:
    """Load-time pruning when the model settings ask for it, and the named plans requests may use (checked now: a
    bad plan file stops the start-up with its name)."""
    kwargs: dict = {"prune_plans": model.prune_plans}
    if model.prune_plan:
        kwargs.update(prune_plan=model.prune_plan, prune_ratio=model.prune_ratio)
    return kwargs
