"""Video jobs: their records, the stores that keep them, and the `VideoJobs` service that runs their lifecycle.

Records live behind a small store interface: in this process (`MemoryJobStore`, one replica) or in Redis
(`RedisJobStore`, shared by several replicas, so a poll, a download or a DELETE may land on any of them).
Every state change of a job goes through the store (no job object is mutated in place and shared):

- `create(job)` records a new job; `update(job)` writes a changed copy *only if the job still exists and was
  not cancelled* and returns False otherwise, so a worker that sees False stops its work (a DELETE on another
  replica removed the job). The worker calls it after every denoising step (progress), which is how a
  cancellation anywhere reaches the replica running the job within one step.
- `delete(job_id)` removes the job and its content and raises its cancel flag (kept for `ttl`);
  `cancelled(ids)` answers which of the given jobs were cancelled (polled for jobs still queued).
- `put_content` / `get_content`: the MP4 bytes, with the same time to live as the job.
- `create(job, input_reference=...)` also keeps an image-to-video job's uploaded image (the bytes as received,
  `get_input`) with the job, and drops it with the job: the server writes no upload anywhere else.

Finished jobs are forgotten after `ttl` seconds, and the oldest finished ones when more than `max_jobs` are kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from typing import Any, Callable, Iterable, Literal, Protocol

from pydantic import BaseModel

from accel.io import video_bytes

from server.scheduler import Cancelled, Scheduler, WorkItem

log = logging.getLogger("accel.server")

VideoStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]


class VideoJob(BaseModel):
    """A video job's record: OpenAI's Video object plus our fields (the API returns it as is)."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: VideoStatus
    progress: int = 0
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    prompt: str
    seconds: str
    size: str
    error: dict[str, Any] | None = None
    remixed_from_video_id: str | None = None
    num_frames: int
    fps: int
    seed: int
    acceleration: dict[str, Any] | None = None


class JobStore(Protocol):
    def create(self, job: VideoJob, input_reference: bytes | None = None) -> None: ...
    def update(self, job: VideoJob) -> bool: ...
    def get(self, job_id: str) -> VideoJob | None: ...
    def delete(self, job_id: str) -> bool: ...
    def list(self) -> list[VideoJob]: ...
    def put_content(self, job_id: str, content: bytes) -> bool: ...
    def get_content(self, job_id: str) -> bytes | None: ...
    def get_input(self, job_id: str) -> bytes | None: ...
    def cancelled(self, job_ids: Iterable[str]) -> set[str]: ...
    def close(self) -> None: ...


def _finished(job: VideoJob) -> bool:
    return job.completed_at is not None


class MemoryJobStore:
    """Jobs, their input images and MP4 bytes in this process (thread-safe: the engine's worker thread writes
    progress)."""

    def __init__(self, ttl: float = 3600.0, max_jobs: int = 1000):
        self.ttl, self.max_jobs = ttl, max_jobs
        self._jobs: dict[str, VideoJob] = {}
        self._content: dict[str, bytes] = {}
        self._inputs: dict[str, bytes] = {}
        self._cancelled: dict[str, float] = {}
        self._lock = threading.RLock()

    def _expire(self) -> None:
        now = time.time()
        for job in [j for j in self._jobs.values() if _finished(j) and now - j.completed_at > self.ttl]:
            self._drop(job.id)
        for job_id in [i for i, t in self._cancelled.items() if now - t > self.ttl]:
            del self._cancelled[job_id]
        finished = sorted((j for j in self._jobs.values() if _finished(j)), key=lambda j: j.completed_at)
        while len(self._jobs) > self.max_jobs and finished:
            self._drop(finished.pop(0).id)

    def _drop(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._content.pop(job_id, None)
        self._inputs.pop(job_id, None)

    def create(self, job: VideoJob, input_reference: bytes | None = None) -> None:
        with self._lock:
            self._jobs[job.id] = job.model_copy(deep=True)
            if input_reference is not None:
                self._inputs[job.id] = input_reference
            self._expire()

    def update(self, job: VideoJob) -> bool:
        with self._lock:
            if job.id not in self._jobs or job.id in self._cancelled:
                return False
            self._jobs[job.id] = job.model_copy(deep=True)
            return True

    def get(self, job_id: str) -> VideoJob | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return job.model_copy(deep=True) if job is not None else None

    def delete(self, job_id: str) -> bool:
        with self._lock:
            existed = job_id in self._jobs
            self._drop(job_id)
            self._cancelled[job_id] = time.time()
            return existed

    def list(self) -> list[VideoJob]:
        with self._lock:
            self._expire()
            return [j.model_copy(deep=True) for j in sorted(self._jobs.values(), key=lambda j: j.created_at)]

    def put_content(self, job_id: str, content: bytes) -> bool:
        with self._lock:
            if job_id not in self._jobs:
                return False
            self._content[job_id] = content
            return True

    def get_content(self, job_id: str) -> bytes | None:
        with self._lock:
            return self._content.get(job_id)

    def get_input(self, job_id: str) -> bytes | None:
        with self._lock:
            return self._inputs.get(job_id)

    def cancelled(self, job_ids: Iterable[str]) -> set[str]:
        with self._lock:
            return {i for i in job_ids if i in self._cancelled}

    def close(self) -> None:
        pass


class RedisJobStore:
    """Jobs in a shared Redis: `<prefix>job:<id>` (JSON), `<prefix>content:<id>` (MP4 bytes), `<prefix>input:<id>`
    (an image-to-video job's uploaded image), `<prefix>cancel:<id>` (flag), all with a time to live, and
    `<prefix>jobs` (sorted set of ids by creation time) for listings.

    A running job's key is rewritten after every step, which renews its time to live; a finished job's key expires
    `ttl` seconds after its last write."""

    def __init__(self, url: str, ttl: float = 3600.0, max_jobs: int = 1000, prefix: str = "accel:"):
        import redis

        self.ttl, self.max_jobs, self.prefix = int(max(1, ttl)), max_jobs, prefix
        self.redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30)
        # SET ... XX unless the cancel flag is up, in one step: a DELETE elsewhere wins over a late progress write
        self._update = self.redis.register_script(
            "if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end "
            "if redis.call('SET', KEYS[1], ARGV[1], 'XX', 'EX', ARGV[2]) then return 1 end return 0"
        )
        self._put_content = self.redis.register_script(
            "if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end "
            "redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2]) return 1"
        )

    def _k(self, kind: str, job_id: str) -> str:
        return f"{self.prefix}{kind}:{job_id}"

    def ping(self) -> None:
        self.redis.ping()

    def create(self, job: VideoJob, input_reference: bytes | None = None) -> None:
        pipe = self.redis.pipeline()
        pipe.set(self._k("job", job.id), job.model_dump_json(), ex=self.ttl)
        if input_reference is not None:
            pipe.set(self._k("input", job.id), input_reference, ex=self.ttl)
        pipe.zadd(self.prefix + "jobs", {job.id: job.created_at})
        pipe.execute()
        self._trim()

    def _trim(self) -> None:
        """Forget the oldest finished jobs beyond `max_jobs` (and ids whose key expired)."""
        index = self.prefix + "jobs"
        excess = self.redis.zcard(index) - self.max_jobs
        if excess <= 0:
            return
        for job_id in self.redis.zrange(index, 0, -1):
            if excess <= 0:
                break
            job = self.get(job_id.decode())
            if job is None or _finished(job):
                self.redis.zrem(index, job_id)
                self.redis.delete(*(self._k(kind, job_id.decode()) for kind in ("job", "content", "input")))
                excess -= 1

    def update(self, job: VideoJob) -> bool:
        keys = [self._k("job", job.id), self._k("cancel", job.id)]
        return bool(self._update(keys=keys, args=[job.model_dump_json(), self.ttl]))

    def get(self, job_id: str) -> VideoJob | None:
        raw = self.redis.get(self._k("job", job_id))
        return VideoJob.model_validate_json(raw) if raw is not None else None

    def delete(self, job_id: str) -> bool:
        pipe = self.redis.pipeline()
        pipe.set(self._k("cancel", job_id), b"1", ex=self.ttl)
        pipe.delete(self._k("job", job_id), self._k("content", job_id), self._k("input", job_id))
        pipe.zrem(self.prefix + "jobs", job_id)
        return bool(pipe.execute()[1])

    def list(self) -> list[VideoJob]:
        ids = [i.decode() for i in self.redis.zrange(self.prefix + "jobs", 0, -1)]
        if not ids:
            return []
        raws = self.redis.mget([self._k("job", i) for i in ids])
        gone = [i for i, raw in zip(ids, raws) if raw is None]
        if gone:
            self.redis.zrem(self.prefix + "jobs", *gone)
        return [VideoJob.model_validate_json(raw) for raw in raws if raw is not None]

    def put_content(self, job_id: str, content: bytes) -> bool:
        keys = [self._k("job", job_id), self._k("content", job_id), self._k("cancel", job_id)]
        return bool(self._put_content(keys=keys, args=[content, self.ttl]))

    def get_content(self, job_id: str) -> bytes | None:
        return self.redis.get(self._k("content", job_id))

    def get_input(self, job_id: str) -> bytes | None:
        return self.redis.get(self._k("input", job_id))

    def cancelled(self, job_ids: Iterable[str]) -> set[str]:
        ids = list(job_ids)
        if not ids:
            return set()
        flags = self.redis.mget([self._k("cancel", i) for i in ids])
        return {i for i, flag in zip(ids, flags) if flag is not None}

    def close(self) -> None:
        self.redis.close()


def make_job_store(settings) -> JobStore:
    """The store the settings name; a Redis store must answer a ping (else a clear error at start-up)."""
    if settings.job_store == "memory":
        return MemoryJobStore(settings.job_ttl_s, settings.max_jobs)
    from server.settings import SettingsError

    try:
        store = RedisJobStore(settings.redis_url, settings.job_ttl_s, settings.max_jobs, settings.redis_prefix)
        store.ping()
    except ImportError:
        raise SettingsError("job_store: 'redis' needs the redis package (pip install redis)") from None
    except Exception as exc:  # noqa: BLE001 - any connection error is one message naming the setting
        raise SettingsError(f"redis_url: cannot reach Redis at {settings.redis_url}: {exc}") from None
    return store


class _JobWriter:
    """This replica's copy of a job it runs. Every change is a new copy written through the store; a write that
    the store refuses (the job was deleted, here or on another replica) answers False and the work stops."""

    def __init__(self, store: JobStore, job: VideoJob):
        self.store, self.job = store, job

    def write(self, **changes: Any) -> bool:
        self.job = self.job.model_copy(update=changes)
        try:
            return self.store.update(self.job)
        except Exception as exc:  # noqa: BLE001 - a store hiccup must not fail the job; the next step retries
            log.warning(json.dumps({"event": "job_store_error", "job": self.job.id, "error": str(exc)}))
            return True


class VideoJobs:
    """The video-job lifecycle, the same over either store: a job is recorded, then its work is queued; the work
    writes the record as it runs (in_progress, progress after every step, then its final state and content); a
    DELETE on any replica stops it. Work is only ever cancelled through `scheduler.cancel`. Store calls from the
    event loop run in a thread (a remote store blocks)."""

    def __init__(self, store: JobStore, scheduler: Scheduler, describe_error: Callable[[BaseException, str], dict]):
        self.store, self.scheduler, self.describe_error = store, scheduler, describe_error
        self.items: dict[str, WorkItem] = {}  # this replica's jobs, queued or running, by job id

    async def submit(self, item: WorkItem, fps: int, input_reference: bytes | None = None) -> VideoJob:
        """Record a queued job for `item` (its parameters resolved; an image-to-video job's uploaded image with it),
        then queue the work. When admission refuses it (`QueueFull`, `Draining`), the record is deleted again and
        the error raised."""
        params = item.params
        job = VideoJob(id="video_" + secrets.token_hex(12), model=item.model, status="queued",
                       created_at=int(time.time()), prompt=params.prompt, seconds=f"{params.num_frames / fps:g}",
                       size=f"{params.width}x{params.height}", num_frames=params.num_frames, fps=fps,
                       seed=params.seed)
        writer = _JobWriter(self.store, job)
        total_steps = params.num_inference_steps or 1

        def on_start() -> None:
            if not writer.write(status="in_progress"):  # deleted (on any replica) before it started
                self.scheduler.cancel(item)

        def on_progress(step: int) -> None:  # in the engine's worker thread, after every step
            if not writer.write(progress=min(99, int(100 * step / total_steps))):
                self.scheduler.cancel(item)  # deleted elsewhere: stop at this step

        item.on_start, item.on_progress = on_start, on_progress
        await asyncio.to_thread(self.store.create, job, input_reference)
        try:
            future = self.scheduler.submit(item)
        except Exception:
            await asyncio.to_thread(self.store.delete, job.id)
            raise
        self.items[job.id] = item
        asyncio.get_running_loop().create_task(self._finish(writer, item, future))
        return job

    async def _finish(self, writer: _JobWriter, item: WorkItem, future: asyncio.Future) -> None:
        job_id = writer.job.id
        final: dict[str, Any] | None = None
        try:
            result = await future
            content = await asyncio.to_thread(video_bytes, result.videos[0], writer.job.fps)
            if await asyncio.to_thread(self.store.put_content, job_id, content):
                final = {"status": "completed", "progress": 100, "acceleration": result.report}
        except Cancelled:
            final = {"status": "cancelled"}
        except asyncio.CancelledError:  # the server is stopping: the record says so instead of staying queued
            writer.write(completed_at=int(time.time()), status="failed",
                         error={"code": "shutdown", "message": "the server stopped before the job finished"})
            raise
        except BaseException as exc:  # noqa: BLE001 - a failed job records its error; the server keeps serving
            final = {"status": "failed", "error": self.describe_error(exc, job_id)}
        finally:
            self.items.pop(job_id, None)
        if final is not None:  # a deleted job stays deleted: the store refuses the write
            await asyncio.to_thread(writer.write, completed_at=int(time.time()), **final)

    async def get(self, job_id: str) -> VideoJob | None:
        return await asyncio.to_thread(self.store.get, job_id)

    async def list(self) -> list[VideoJob]:
        return await asyncio.to_thread(self.store.list)

    async def content(self, job_id: str) -> bytes | None:
        return await asyncio.to_thread(self.store.get_content, job_id)

    async def delete(self, job_id: str) -> bool:
        """Delete the job in the store and raise its cancel flag: the replica running it (this one or another)
        stops within one step; one where it still waits drops it within `job_poll_s` (`watch`)."""
        existed = await asyncio.to_thread(self.store.delete, job_id)
        item = self.items.get(job_id)
        if item is not None:
            self.scheduler.cancel(item)  # ours: a running batch stops within one step
        return existed

    async def watch(self, poll_s: float) -> None:
        """Cancel jobs of this replica that a DELETE on another replica cancelled while they were still queued (a
        running job notices by itself within one step: its progress write fails)."""
        while True:
            await asyncio.sleep(poll_s)
            waiting = {job_id: item for job_id, item in self.items.items() if item.started is None}
            if not waiting:
                continue
            try:
                cancelled = await asyncio.to_thread(self.store.cancelled, list(waiting))
            except Exception as exc:  # noqa: BLE001 - a store outage must not kill the watcher
                log.warning(json.dumps({"event": "job_store_error", "error": str(exc)}))
                continue
            for job_id in cancelled:
                self.scheduler.cancel(waiting[job_id])

    def close(self) -> None:
        self.store.close()
