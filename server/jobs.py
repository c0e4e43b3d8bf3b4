"""Video job records behind a small store interface (in-process here; a shared store can implement the same)."""

from __future__ import annotations

import time
from typing import Protocol

from server.api.schemas import VideoJob


class JobStore(Protocol):
    def put(self, job: VideoJob) -> None: ...
    def get(self, job_id: str) -> VideoJob | None: ...
    def delete(self, job_id: str) -> None: ...
    def list(self) -> list[VideoJob]: ...
    def put_content(self, job_id: str, content: bytes) -> None: ...
    def get_content(self, job_id: str) -> bytes | None: ...


class MemoryJobStore:
    """Jobs and their MP4 bytes in this process; finished jobs are forgotten after `ttl` seconds, and the oldest
    finished ones when more than `max_jobs` are kept."""

    def __init__(self, ttl: float = 3600.0, max_jobs: int = 1000):
        self.ttl, self.max_jobs = ttl, max_jobs
        self._jobs: dict[str, VideoJob] = {}
        self._content: dict[str, bytes] = {}

    def _expire(self) -> None:
        now = time.time()
        finished = [j for j in self._jobs.values() if j.completed_at is not None]
        for job in finished:
            if now - job.completed_at > self.ttl:
                self.delete(job.id)
        finished = sorted((j for j in self._jobs.values() if j.completed_at is not None), key=lambda j: j.completed_at)
        while len(self._jobs) > self.max_jobs and finished:
            self.delete(finished.pop(0).id)

    def put(self, job: VideoJob) -> None:
        self._jobs[job.id] = job
        self._expire()

    def get(self, job_id: str) -> VideoJob | None:
        return self._jobs.get(job_id)

    def delete(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._content.pop(job_id, None)

    def list(self) -> list[VideoJob]:
        self._expire()
        return sorted(self._jobs.values(), key=lambda j: j.created_at)

    def put_content(self, job_id: str, content: bytes) -> None:
        self._content[job_id] = content

    def get_content(self, job_id: str) -> bytes | None:
        return self._content.get(job_id)

    def active_count(self) -> int:
        return sum(1 for j in self._jobs.values() if j.status in ("queued", "in_progress"))
