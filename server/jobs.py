"""Video job records behind a small store interface: in this process (`MemoryJobStore`, one replica) or in Redis
(`RedisJobStore`, shared by several replicas, so a poll, a download or a DELETE may land on any of them).

Every state change of a job goes through the store (no job object is mutated in place and shared):

- `create(job)` records a new job; `update(job)` writes a changed copy *only if the job still exists and was
  not cancelled* and returns False otherwise, so a worker that sees False stops its work (a DELETE on another
  replica removed the job). The worker calls it after every denoising step (progress), which is how a
  cancellation anywhere reaches the replica running the job within one step.
- `delete(job_id)` removes the job and its content and raises its cancel flag (kept for `ttl`);
  `cancelled(ids)` answers which of the given jobs were cancelled (polled for jobs still queued).
- `put_content` / `get_content`: the MP4 bytes, with the same time to live as the job.

Finished jobs are forgotten after `ttl` seconds, and the oldest finished ones when more than `max_jobs` are kept.
"""

from __future__ import annotations

import threading
import time
from typing import Iterable, Protocol

from server.api.schemas import VideoJob


class JobStore(Protocol):
    def create(self, job: VideoJob) -> None: ...
    def update(self, job: VideoJob) -> bool: ...
    def get(self, job_id: str) -> VideoJob | None: ...
    def delete(self, job_id: str) -> bool: ...
    def list(self) -> list[VideoJob]: ...
    def put_content(self, job_id: str, content: bytes) -> bool: ...
    def get_content(self, job_id: str) -> bytes | None: ...
    def cancelled(self, job_ids: Iterable[str]) -> set[str]: ...
    def close(self) -> None: ...


def _finished(job: VideoJob) -> bool:
    return job.completed_at is not None


class MemoryJobStore:
    """Jobs and their MP4 bytes in this process (thread-safe: the engine's worker thread writes progress)."""

    def __init__(self, ttl: float = 3600.0, max_jobs: int = 1000):
        self.ttl, self.max_jobs = ttl, max_jobs
        self._jobs: dict[str, VideoJob] = {}
        self._content: dict[str, bytes] = {}
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

    def create(self, job: VideoJob) -> None:
        with self._lock:
            self._jobs[job.id] = job.model_copy(deep=True)
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

    def cancelled(self, job_ids: Iterable[str]) -> set[str]:
        with self._lock:
            return {i for i in job_ids if i in self._cancelled}

    def active_count(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.status in ("queued", "in_progress"))

    def close(self) -> None:
        pass


class RedisJobStore:
    """Jobs in a shared Redis: `<prefix>job:<id>` (JSON), `<prefix>content:<id>` (MP4 bytes), `<prefix>cancel:<id>`
    (flag), all with a time to live, and `<prefix>jobs` (sorted set of ids by creation time) for listings.

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

    def create(self, job: VideoJob) -> None:
        pipe = self.redis.pipeline()
        pipe.set(self._k("job", job.id), job.model_dump_json(), ex=self.ttl)
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
                self.redis.delete(self._k("job", job_id.decode()), self._k("content", job_id.decode()))
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
        pipe.delete(self._k("job", job_id), self._k("content", job_id))
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
