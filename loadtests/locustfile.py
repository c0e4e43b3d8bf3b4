"""Locust scenarios for the diffusion-accel server (HTTP only; no `server` or `accel` import).

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000        # web UI
    python -m loadtests --host http://127.0.0.1:8000 --users 4 ...        # headless, with reports

Scenarios (users are picked by weight; `LOADTEST_SCENARIOS=images,videos` chooses the classes):

- `ImageUser` (`images`, needs a text-to-image model): `POST /v1/images/generations` with a mix of sizes, presets
  (`off`, `quality`, `balanced`, `fast`, or through OpenAI's `quality`) and explicit knobs (`fbcache:threshold=0.1`,
  `sortblock:K=3`).
- `VideoUser` (`videos`, needs a text-to-video model): `POST /v1/videos`, poll `GET /v1/videos/{id}` until done,
  `GET .../content`.

At test start the served models are read from `GET /v1/models`: a scenario whose task no served model has (or whose
`LOADTEST_*_MODEL` is not served, or serves another task) is skipped with a warning naming why, so a server with
only an image model gets image traffic only. When no scenario is left the test stops with exit code 1.

Environment: `LOADTEST_ACCEL` forces one acceleration on every request (comparison mode); `LOADTEST_IMAGE_MODEL`,
`LOADTEST_VIDEO_MODEL` (default: the server's default model per task); `LOADTEST_STEPS` (default 4);
`LOADTEST_SIZES` (default `64x64,128x128,64x128`); `LOADTEST_RATE` (open loop: requests/s over all users, each
user paced with `constant_throughput`); `LOADTEST_RECORDS` (a JSONL file: one line per request, for the runner);
`LOADTEST_API_KEY` (Bearer key).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import contextmanager

from gevent import GreenletExit

import requests
from locust import HttpUser, between, constant_throughput, events, task
from locust.exception import StopTest

ACCEL = os.environ.get("LOADTEST_ACCEL") or None
IMAGE_MODEL = os.environ.get("LOADTEST_IMAGE_MODEL") or None
VIDEO_MODEL = os.environ.get("LOADTEST_VIDEO_MODEL") or None
STEPS = int(os.environ.get("LOADTEST_STEPS", "4"))
SIZES = os.environ.get("LOADTEST_SIZES", "64x64,128x128,64x128").split(",")
RATE = float(os.environ.get("LOADTEST_RATE", "0") or 0)
USERS = max(1, int(os.environ.get("LOADTEST_USERS", "1")))
VIDEO_TIMEOUT_S = float(os.environ.get("LOADTEST_VIDEO_TIMEOUT_S", "120"))
HEADERS = {"authorization": f"Bearer {os.environ['LOADTEST_API_KEY']}"} if os.environ.get("LOADTEST_API_KEY") else {}

PRESETS = ["off", "quality", "balanced", "fast"]
KNOBS = ["fbcache:threshold=0.1", "sortblock:K=3"]

TASKS = {"images": "text-to-image", "videos": "text-to-video"}  # scenario -> the model task it needs

log = logging.getLogger("loadtests")
_records = None
_in_flight = {"started": 0, "finished": 0, "stopped": 0}


def plan_scenarios(wanted: list[str], models: list[dict], named: dict[str, str | None]) -> tuple[list[str], dict]:
    """Which of the `wanted` scenarios the served `models` (`/v1/models` entries: id, task) support; `named` maps a
    scenario to the model it must use (None: any of its task). Returns (kept, {skipped: why})."""
    served = {m["id"]: m.get("task") for m in models}
    listing = ", ".join(f"{m} ({t})" for m, t in served.items()) or "none"
    kept, skipped = [], {}
    for name in wanted:
        task, model = TASKS.get(name), named.get(name)
        if task is None:
            skipped[name] = f"unknown scenario (known: {', '.join(TASKS)})"
        elif model is not None and model not in served:
            skipped[name] = f"model {model!r} is not served (served: {listing})"
        elif model is not None and served[model] != task:
            skipped[name] = f"model {model!r} is a {served[model]} model, {name} need {task}"
        elif model is None and task not in served.values():
            skipped[name] = f"no {task} model is served (served: {listing})"
        else:
            kept.append(name)
    return kept, skipped


def served_models(host: str) -> list[dict]:
    response = requests.get(host.rstrip("/") + "/v1/models", headers=HEADERS, timeout=30)
    response.raise_for_status()
    return response.json()["data"]


@events.test_start.add_listener
def _open_records(environment, **_):
    global _records
    path = os.environ.get("LOADTEST_RECORDS")
    if path:
        _records = open(path, "a", buffering=1)


@events.test_start.add_listener
def _choose_scenarios(environment, **_):
    """Keep only the user classes whose scenario the server can serve (the runner picks users from this list)."""
    host = environment.host or next((c.host for c in environment.user_classes if c.host), None)
    wanted = [name for name in os.environ.get("LOADTEST_SCENARIOS", "images,videos").split(",") if name]
    try:
        models = served_models(host)
    except Exception as exc:  # noqa: BLE001 - any failure here is one clear stop
        environment.process_exit_code = 1
        raise StopTest(f"cannot read the served models from {host}/v1/models: {exc}") from None
    kept, skipped = plan_scenarios(wanted, models, {"images": IMAGE_MODEL, "videos": VIDEO_MODEL})
    for name, why in skipped.items():
        log.warning("scenario %s skipped: %s", name, why)
    if _records is not None:
        _records.write(json.dumps({"scenarios": kept, "skipped": skipped}) + "\n")
    if not kept:
        environment.process_exit_code = 1
        raise StopTest(f"no scenario left to run against {host}: "
                       + "; ".join(f"{name}: {why}" for name, why in skipped.items()))
    classes = {SCENARIO_CLASSES[name] for name in kept}
    environment.user_classes[:] = [c for c in environment.user_classes if c in classes]
    if not environment.user_classes:
        environment.process_exit_code = 1
        raise StopTest(f"the user classes chosen on the command line run none of the scenarios {kept}")


@events.request.add_listener
def _record(request_type, name, response_time, response_length, response=None, exception=None, context=None, **_):
    _in_flight["finished"] += 1
    if _records is not None:
        status = getattr(response, "status_code", 0) or 0
        _records.write(json.dumps({"t": time.time() - response_time / 1000, "name": name, "method": request_type,
                                   "ms": response_time, "status": status, "error": str(exception) if exception else None,
                                   **(context or {})}) + "\n")


@events.quitting.add_listener
def _close_records(environment, **_):
    if _records is not None:
        _records.write(json.dumps({"summary": True, **_in_flight}) + "\n")
        _records.close()


def _pacing():
    if RATE > 0:  # open loop (approximately): every user paced to RATE / USERS requests per second
        return constant_throughput(RATE / USERS)
    return between(0.0, 0.05)


class _Base(HttpUser):
    abstract = True

    @contextmanager
    def request(self, method: str, path: str, name: str, **kwargs):
        """One request; counted as started, then finished (Locust's request event) or stopped (the run ended
        and Locust killed the user mid-request: not a server fault). Started - finished - stopped = lost."""
        _in_flight["started"] += 1
        try:
            with self.client.request(method, path, name=name, headers=HEADERS, catch_response=True, **kwargs) as r:
                yield r
        except GreenletExit:
            _in_flight["stopped"] += 1
            raise


class ImageUser(_Base):
    weight = 4
    wait_time = _pacing()

    def _generate(self, body: dict, scenario: str):
        body = {"prompt": random.choice(["a red circle", "a blue square on the left", "a green triangle"]),
                "seed": random.randrange(2**31), "num_inference_steps": STEPS, **body}
        if IMAGE_MODEL:
            body["model"] = IMAGE_MODEL
        if ACCEL is not None:
            body.pop("quality", None)
            body["acceleration"] = ACCEL
        with self.request("POST", "/v1/images/generations", "images", json=body, context={"scenario": scenario}) as r:
            if r.status_code == 200 and r.json().get("data"):
                r.success()
            else:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(3)
    def preset(self):
        self._generate({"size": random.choice(SIZES), "acceleration": random.choice(PRESETS)}, "preset")

    @task(1)
    def openai_quality(self):
        self._generate({"size": random.choice(SIZES), "quality": random.choice(["low", "medium", "high"])}, "quality")

    @task(1)
    def explicit_knobs(self):
        self._generate({"size": random.choice(SIZES), "acceleration": random.choice(KNOBS)}, "knobs")


class VideoUser(_Base):
    weight = 1
    wait_time = _pacing()

    @task
    def video_job(self):
        body = {"prompt": "a ball rolls", "size": "32x32", "num_frames": 5, "num_inference_steps": STEPS,
                "seed": random.randrange(2**31)}
        if VIDEO_MODEL:
            body["model"] = VIDEO_MODEL
        if ACCEL is not None:
            body["acceleration"] = ACCEL
        with self.request("POST", "/v1/videos", "videos:create", json=body) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return
            r.success()
            job_id = r.json()["id"]
        deadline = time.time() + VIDEO_TIMEOUT_S
        while True:
            with self.request("GET", f"/v1/videos/{job_id}", "videos:poll") as r:
                status = r.json().get("status") if r.status_code == 200 else None
                if r.status_code != 200 or status in ("failed", "cancelled"):
                    r.failure(f"{r.status_code}: {r.text[:200]}")
                    return
                r.success()
            if status == "completed":
                break
            if time.time() > deadline:  # counted as a lost job
                self.environment.events.request.fire(
                    request_type="GET", name="videos:lost", response_time=VIDEO_TIMEOUT_S * 1000, response_length=0,
                    response=None, context={}, exception=TimeoutError(f"video job {job_id} did not finish"))
                return
            time.sleep(0.1)
        with self.request("GET", f"/v1/videos/{job_id}/content", "videos:content") as r:
            if r.status_code == 200 and r.content[4:8] == b"ftyp":
                r.success()
            else:
                r.failure(f"{r.status_code}: not an MP4")


SCENARIO_CLASSES = {"images": ImageUser, "videos": VideoUser}
