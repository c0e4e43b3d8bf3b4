"""Video jobs behind several replicas: two real `accel serve` processes share one real `redis-server` (started
here on a free port, no persistence); a job submitted on one is polled, fetched and cancelled on the other.
Plus the store contract, run against both stores."""

import shutil
import subprocess
import time

import httpx
import pytest

from server.jobs import MemoryJobStore, RedisJobStore, VideoJob
from server.settings import SettingsError, load_settings
from server_fixtures import ServeProcess, free_port



@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: install Debian's package (apt-get install -y redis-server); "
                    ".ci/run and scripts/setup.sh do it when they can")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.time() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield url
    process.terminate()
    process.wait(timeout=10)


def _job(job_id="video_1", **kw) -> VideoJob:
    base = dict(id=job_id, model="m", status="queued", created_at=int(time.time()), prompt="p", seconds="1",
                size="32x32", num_frames=5, fps=8, seed=1)
    return VideoJob(**{**base, **kw})


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_store_contract(kind, redis_url):
    store = MemoryJobStore() if kind == "memory" else RedisJobStore(redis_url, prefix=f"t{time.time_ns()}:")
    job = _job()
    store.create(job)
    assert store.get(job.id) == job and store.get("nope") is None
    assert store.update(job.model_copy(update={"status": "in_progress", "progress": 40}))
    assert store.get(job.id).progress == 40 and [j.id for j in store.list()] == [job.id]
    assert store.put_content(job.id, b"mp4") and store.get_content(job.id) == b"mp4"
    assert store.cancelled([job.id]) == set()
    assert store.delete(job.id)
    assert store.get(job.id) is None and store.get_content(job.id) is None and store.list() == []
    assert store.cancelled([job.id, "other"]) == {job.id}
    assert not store.update(job.model_copy(update={"progress": 50}))  # a late write does not resurrect it
    assert not store.put_content(job.id, b"mp4") and store.get(job.id) is None
    store.close()


def test_settings_validate_the_store():
    with pytest.raises(SettingsError, match="job_store"):
        load_settings(job_store="postgres")
    with pytest.raises(SettingsError, match="redis_url"):
        load_settings(job_store="redis", redis_url="http://localhost")
    from server.app import create_app

    with pytest.raises(SettingsError, match="redis_url: cannot reach"):
        create_app(load_settings(job_store="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0"))


def replica(redis_url: str, prefix: str) -> ServeProcess:
    return ServeProcess(job_store="redis", redis_url=redis_url, redis_prefix=prefix, max_steps="500",
                        models=[{"id": "tiny-wan", "source": "tiny-wan"}])


def _wait_status(url: str, job_id: str, status: str, seconds: float = 30) -> dict:
    deadline = time.time() + seconds
    while time.time() < deadline:
        job = httpx.get(f"{url}/v1/videos/{job_id}", timeout=5).json()
        if job["status"] == status:
            return job
        time.sleep(0.05)
    pytest.fail(f"job {job_id} did not reach {status}: {job}")


def test_two_replicas_share_jobs_through_redis(redis_url):
    prefix = f"r{time.time_ns()}:"
    a, b = replica(redis_url, prefix), replica(redis_url, prefix)
    try:
        a.wait_ready()
        b.wait_ready()
        small = {"model": "tiny-wan", "size": "32x32", "num_frames": 5, "seed": 1}

        # submitted on A, polled (progress moves) and downloaded on B
        job = httpx.post(a.url + "/v1/videos", json={**small, "prompt": "a ball", "num_inference_steps": 40},
                         timeout=10).json()
        seen, deadline = set(), time.time() + 30
        while time.time() < deadline:
            polled = httpx.get(f"{b.url}/v1/videos/{job['id']}", timeout=5).json()
            seen.add(polled["progress"])
            if polled["status"] == "completed":
                break
            time.sleep(0.02)
        assert polled["status"] == "completed" and polled["acceleration"] is not None
        assert len(seen - {0, 100}) >= 1  # B saw intermediate progress written by A's worker
        content = httpx.get(f"{b.url}/v1/videos/{job['id']}/content", timeout=10)
        assert content.status_code == 200 and content.content[4:8] == b"ftyp"
        assert job["id"] in [j["id"] for j in httpx.get(b.url + "/v1/videos", timeout=5).json()["data"]]

        # a long job on A, cancelled by a DELETE on B: A's worker stops within a step and is free again
        slow = httpx.post(a.url + "/v1/videos", json={**small, "prompt": "slow", "num_inference_steps": 500},
                          timeout=10)
        assert slow.status_code == 200, slow.text
        slow = slow.json()
        marks, deadline = {}, time.time() + 30
        while len(marks) < 2:  # progress is in %: 1% = 5 steps
            progress = httpx.get(f"{b.url}/v1/videos/{slow['id']}", timeout=5).json()["progress"]
            if progress >= 1:
                marks.setdefault(progress, time.time())
            assert time.time() < deadline, "the slow job made no progress"
            time.sleep(0.01)
        seconds_per_step = (max(marks.values()) - min(marks.values())) / (5 * (max(marks) - min(marks)))
        # a job queued behind it on A, deleted on B while it waits: A drops it (its watcher polls the flags)
        queued = httpx.post(a.url + "/v1/videos", json={**small, "prompt": "queued", "num_inference_steps": 2},
                            timeout=10).json()
        assert httpx.delete(f"{b.url}/v1/videos/{queued['id']}", timeout=5).json()["deleted"]
        assert a.metric("accel_running") == 1
        deleted_at = time.time()
        assert httpx.delete(f"{b.url}/v1/videos/{slow['id']}", timeout=5).json()["deleted"]
        assert httpx.get(f"{a.url}/v1/videos/{slow['id']}", timeout=5).status_code == 404
        while a.metric("accel_running") != 0:
            assert time.time() - deleted_at < 5, "replica A kept running the deleted job"
            time.sleep(0.01)
        stopped_after = time.time() - deleted_at
        remaining = seconds_per_step * (500 - 5 * max(marks))
        assert stopped_after < remaining / 4, (stopped_after, remaining)  # stopped, did not run to the end
        assert a.metric("accel_queue_depth") == 0  # the queued job was dropped, not run
        after = httpx.post(a.url + "/v1/videos", json={**small, "prompt": "next", "num_inference_steps": 3},
                           timeout=10).json()
        _wait_status(b.url, after["id"], "completed", 30)
        assert httpx.get(f"{a.url}/v1/videos/{slow['id']}", timeout=5).status_code == 404  # stays deleted
    finally:
        logs = a.stop() + b.stop()
    assert "Traceback" not in logs, logs
