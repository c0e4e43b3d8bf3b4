"""CI smoke load test: `python -m loadtests` (Locust, headless) against a real `accel serve` process with the tiny
models for ~20 s; fails on any 5xx, request without a response, or lost request/job. Plain `locust` against a
server with an image model only runs the image scenario (videos skipped, named in the log) without failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server_fixtures import ServeProcess

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server_url():
    server = ServeProcess(queue_size=256, models=[{"id": "tiny-flux", "source": "tiny-flux"},
                                                  {"id": "tiny-wan", "source": "tiny-wan"}]).wait_ready()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def image_only_url():
    server = ServeProcess(models=[{"id": "tiny-flux", "source": "tiny-flux"}]).wait_ready()
    yield server.url
    server.stop()


def test_loadtests_do_not_import_server_or_accel():
    for path in (ROOT / "loadtests").glob("*.py"):
        text = path.read_text()
        assert "import server" not in text and "from server" not in text, path
        assert "import accel" not in text and "from accel" not in text, path


def test_smoke_load_has_no_5xx_and_loses_nothing(server_url, tmp_path):
    out = tmp_path / "load"
    command = [sys.executable, "-m", "loadtests", "--host", server_url, "--users", "4", "--spawn-rate", "4",
               "--duration", "20s", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    run = report["runs"][0]
    assert run["server_errors"] == 0 and run["no_response"] == 0 and run["lost"] == 0
    assert run["requests"] > 10 and run["image_latency_ms"]["p50"] > 0 and run["videos_completed"] >= 1
    assert set(run["status_counts"]) == {"200"}
    assert run["server"]["batch_size"]["count"] > 0 and run["server"]["queue_seconds"]["mean"] is not None
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"
    assert "| run |" in (out / "report.md").read_text()


def test_plain_locust_skips_scenarios_the_server_cannot_serve(image_only_url, tmp_path):
    """Default scenarios (images, videos) against a server with no video model: before the fix every video request
    failed with a 400 (the run's failures); now videos are skipped, named with the reason, and nothing fails."""
    stats = tmp_path / "stats.json"
    command = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
               "--host", image_only_url, "--users", "3", "--spawn-rate", "3", "--run-time", "6s",
               "--stop-timeout", "30", "--only-summary", "--json-file", str(stats.with_suffix(""))]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "scenario videos skipped: no text-to-video model is served" in output, output[-3000:]
    entries = json.loads(stats.read_text())
    assert {e["name"] for e in entries} == {"images"}, entries
    assert sum(e["num_requests"] for e in entries) > 0
    assert sum(e["num_failures"] for e in entries) == 0, entries


def test_locust_stops_clearly_when_no_scenario_is_served(image_only_url, tmp_path):
    """Only videos asked of a server without a video model: a clear stop, exit code 1, and no request sent."""
    command = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
               "--host", image_only_url, "--users", "1", "--spawn-rate", "1", "--run-time", "20s", "--only-summary"]
    env = {**os.environ, "LOADTEST_SCENARIOS": "videos"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "no scenario left to run" in output and "no text-to-video model is served" in output, output[-3000:]


def test_overload_soak_and_video_cancel_30s(tmp_path):
    """`python -m loadtests.overload --serve` for about 30 s: a 10x burst over capacity (queue 8 + batch 2), a 10 s
    soak at the batch size, and one video job deleted after its first progress."""
    out = tmp_path / "overload"
    command = [sys.executable, "-m", "loadtests.overload", "--serve", "--queue-size", "8", "--max-batch-size", "2",
               "--duration-s", "10", "--sample-s", "1", "--video-cancels", "1", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = json.loads((out / "report.json").read_text())
    assert result.returncode == 0 and report["ok"], result.stdout[-4000:] + result.stderr[-2000:]
    burst, soak, video = report["burst"], report["soak"], report["video_cancel"]
    # a request that never got an answer, or an answer given twice (or to another request's id)
    for phase in (burst, soak):
        assert phase["lost"] == 0 and phase["duplicated"] == 0 and phase["misrouted"] == 0, phase
        assert phase["server_errors"] == 0 and phase["unlogged"] == 0, phase
    # admission: 100 requests for room 10 must meet 429 (a queue that grows without bound would serve them all),
    # refused at once (server-side time, not after waiting for the queue) and with Retry-After
    assert burst["requests"] == 100 and burst["served"] + burst["rejected_429"] == 100 and burst["other"] == 0
    assert burst["served"] >= 8 and burst["rejected_429"] >= 50, burst
    assert burst["time_to_429_ms"]["source"] == "server access log" and burst["time_to_429_ms"]["p99"] < 2000
    assert burst["missing_retry_after"] == 0
    # the soak at capacity: every request served; per-request leaks of fds or threads would grow with its count
    assert soak["served"] == soak["requests"] > 10, soak
    assert soak["process"]["fds"]["growth"] <= 16 and soak["process"]["threads"]["growth"] <= 8, soak["process"]
    assert len(soak["samples"]) >= 5
    # DELETE stops the work: the device is free long before the job's remaining steps would have run
    cancel = video["cancels"][0]
    assert cancel["delete_status"] == 200 and cancel["get_after_delete"] == 404, cancel
    assert cancel["busy_after_delete_ms"] < cancel["steps_left_ms"], (cancel, video["step_ms"])
    assert "## Burst" in (out / "report.md").read_text()
