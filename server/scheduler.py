"""Admission, queue, batching and deadlines.

- Admission: at most `queue_size` requests wait; beyond that `QueueFull` (the route answers 429 with
  Retry-After at once). While draining, nothing is admitted.
- Batching: the oldest waiting request opens a batch; requests with the same model, generation knobs (size,
  steps, guidance, frames; defaults filled in), LoRA adapter set (names and scales; activated for that batch's
  call only) and acceleration spec (its canonical key) join it, up to
  `max_batch_size`, waiting at most `max_batch_wait_ms` after the oldest arrived. Incompatible requests are
  never mixed, and a spec whose methods decide from the batch's data (`AccelSpec.batch_invariant` False:
  Sortblock, FBCache, DBCache) runs alone, so no output depends on who else was in its batch. A request with
  input images (an edit, image-to-video) runs alone too (`accel.generate.runs_alone`).
- Deadlines and cancellation: polled after every denoising step; a batch whose requests are all cancelled or
  past their deadline is interrupted, so the device is free within one step.
- Failures: a failed batch of several requests is retried one by one, so a bad request fails alone; an
  out-of-memory error fails the batch with 503 after freeing device memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from accel.errors import AccelError
from accel.generate import GenerationParams, GenerationResult, runs_alone
from accel.spec import AccelSpec

from server.engine import BatchRecord, Engine, work_key
from server.metrics import Metrics
from server.settings import ServerSettings

log = logging.getLogger("accel.server")


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


class Cancelled(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


class OutOfMemory(Exception):
    pass


@dataclass
class WorkItem:
    """One admitted request: parameters resolved against its model and its spec parsed, both once, by the route."""

    model: str
    params: GenerationParams
    spec: AccelSpec
    deadline: float  # time.monotonic()
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    cancelled: bool = False
    on_progress: Callable[[int], None] | None = None  # steps done, after every step
    on_start: Callable[[], None] | None = None
    future: asyncio.Future | None = None
    record: BatchRecord | None = None  # what the engine ran for this request's batch, once it ran
    last_step: int = 0  # denoising steps finished so far (polled by the worker after each step)
    cancel_step: int | None = None  # `last_step` when the cancel arrived: the worker stops at most one step later

    @property
    def key(self) -> tuple:
        return work_key(self.model, self.params, self.spec)

    def expired(self, now: float | None = None) -> bool:
        return (now or time.monotonic()) > self.deadline


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


class Scheduler:
    def __init__(self, engine: Engine, settings: ServerSettings, metrics: Metrics):
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.pending: list[WorkItem] = []
        self.running: list[WorkItem] = []
        self.draining = False
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task: asyncio.Task | None = None

    # -- admission -------------------------------------------------------------------------------------------
    def submit(self, item: WorkItem) -> asyncio.Future:
        if self.draining:
            self.metrics.rejected.inc()
            raise Draining()
        if len(self.pending) >= self.settings.queue_size:
            self.metrics.rejected.inc()
            raise QueueFull()
        item.future = asyncio.get_running_loop().create_future()
        self.pending.append(item)
        self.metrics.queue_depth.set(len(self.pending))
        self._arrived.set()
        return item.future

    def cancel(self, item: WorkItem) -> None:
        """Cancel a waiting or running item; a running batch stops at the next step if nothing in it is left.
        The one way work is cancelled; also called from the engine's thread for a running item (flags only)."""
        item.cancelled = True
        item.cancel_step = item.last_step
        if item in self.pending:
            self.pending.remove(item)
            self.metrics.queue_depth.set(len(self.pending))
            self._finish(item, exc=Cancelled())

    # -- the loop --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def drain(self, grace: float) -> None:
        """Stop admission, let queued and running work finish for up to `grace` seconds, cancel the rest."""
        self.draining = True
        end = time.monotonic() + grace
        while (self.pending or self.running) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for item in list(self.pending) + list(self.running):
            self.cancel(item)

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._run(batch)

    async def _next_batch(self) -> list[WorkItem]:
        while True:
            self._drop_dead()
            if not self.pending:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            head = self.pending[0]
            alone = runs_alone(head.params) or not head.spec.batch_invariant
            limit = 1 if alone else self.settings.max_batch_size
            batch = [item for item in self.pending if item.key == head.key][:limit]
            wait = head.enqueued + self.settings.max_batch_wait_ms / 1000 - time.monotonic()
            if len(batch) < limit and wait > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), timeout=wait)
                except asyncio.TimeoutError:
                    pass
                continue
            for item in batch:
                self.pending.remove(item)
            self.metrics.queue_depth.set(len(self.pending))
            return batch

    def _drop_dead(self) -> None:
        now = time.monotonic()
        for item in list(self.pending):
            if item.expired(now):
                self.pending.remove(item)
                self._finish(item, exc=DeadlineExceeded())
        self.metrics.queue_depth.set(len(self.pending))

    async def _run(self, batch: list[WorkItem]) -> None:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for item in batch:
            item.started = now
            self.metrics.queue_seconds.observe(now - item.enqueued)
            if item.on_start:
                item.on_start()
        self.running = list(batch)
        self.metrics.running.set(len(batch))
        self.metrics.batch_size.observe(len(batch))

        def should_stop(step: int) -> bool:
            for item in batch:
                item.last_step = step
                if item.on_progress:
                    item.on_progress(step)
            return all(item.cancelled or item.expired() for item in batch)

        head = batch[0]
        try:
            results, record = await loop.run_in_executor(
                self._executor, self.engine.run, head.model, [i.params for i in batch], head.spec, should_stop
            )
        except Exception as exc:  # noqa: BLE001 - sorted below: OOM, one-by-one retry, or the item's own error
            self.running = []
            self.metrics.running.set(0)
            if _is_oom(exc):
                self.engine.free_device_memory()
                for item in batch:
                    self._finish(item, exc=OutOfMemory(str(exc)))
            elif len(batch) > 1:
                log.warning('{"event": "batch_failed_retrying_alone", "size": %d, "error": %s}', len(batch),
                            json.dumps(str(exc)))
                for item in batch:
                    await self._run([item])
            else:
                self._finish(head, exc=exc)
            return
        self.running = []
        self.metrics.running.set(0)
        self.metrics.run_seconds.labels(head.model).observe(results[0].seconds)
        self._observe_acceleration(head.spec, results[0])
        estimate = (results[0].report.get("estimate") or {}).get("psnr")
        if estimate is not None:
            self.metrics.estimated_psnr.labels(head.model).observe(estimate)
        for item, result in zip(batch, results):
            item.record = record
            if item.cancelled:
                self._finish(item, exc=Cancelled())
            elif item.expired():
                self._finish(item, exc=DeadlineExceeded())
            elif result.interrupted:  # stopped with nothing decoded (should_stop said so): never an empty answer
                self._finish(item, exc=Cancelled())
            else:
                self._finish(item, result=result)

    def _observe_acceleration(self, spec: AccelSpec, result: GenerationResult) -> None:
        fraction = result.report.get("block_fraction_computed", 1.0)
        for name in [config.method for config in spec] or ["off"]:
            self.metrics.block_skip_ratio.labels(name).observe(1.0 - fraction)
            if 0 < fraction < 1:
                self.metrics.time_saved.labels(name).inc(result.seconds * (1 - fraction) / fraction)

    def _finish(self, item: WorkItem, *, result: GenerationResult | None = None, exc: BaseException | None = None):
        item.finished = time.monotonic()
        if item.future is None or item.future.done():
            return
        if exc is not None:
            if isinstance(exc, AccelError):
                self.metrics.errors.labels("invalid_request").inc()
            elif not isinstance(exc, Cancelled):
                self.metrics.errors.labels(type(exc).__name__).inc()
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)
