"""The HTTP server over real HTTP (uvicorn in a thread): OpenAI client, batching, overload, cancellation, errors."""

import base64
import concurrent.futures as cf
import io
import time

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from accel.generate import GenerationParams, generate
from accel.io import image_bytes
from server_fixtures import LiveServer

SMALL = {"size": "64x64", "num_inference_steps": 4}


@pytest.fixture(scope="module")
def live():
    with LiveServer(max_batch_size=4, max_batch_wait_ms=250, max_steps=1000) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def record_batches(engine, monkeypatch) -> list:
    """The batch records `engine.run` returns from now on (until the test ends), in order."""
    records, run = [], engine.run

    def recording(*args):
        results, record = run(*args)
        records.append(record)
        return results, record

    monkeypatch.setattr(engine, "run", recording)
    return records


@pytest.fixture
def records(live, monkeypatch):
    return record_batches(live.state.engine, monkeypatch)


def png(b64: str) -> bytes:
    return base64.b64decode(b64)


def test_images_with_the_openai_client_are_reproducible_and_match_the_library(live, client):
    first = client.images.generate(model="tiny-flux", prompt="a red circle", size="64x64",
                                   extra_body={"seed": 7, "num_inference_steps": 4})
    second = client.images.generate(model="tiny-flux", prompt="a red circle", size="64x64",
                                    extra_body={"seed": 7, "num_inference_steps": 4})
    assert png(first.data[0].b64_json) == png(second.data[0].b64_json)
    assert Image.open(io.BytesIO(png(first.data[0].b64_json))).size == (64, 64)
    # the library gives the same bytes for the same request and seed
    pipe = live.state.engine.models["tiny-flux"].pipe
    direct = generate(pipe, GenerationParams.parse(prompt="a red circle", seed=7, height=64, width=64,
                                                   num_inference_steps=4))
    assert image_bytes(direct.images[0]) == png(first.data[0].b64_json)


def test_acceleration_changes_output_exactly_when_blocks_are_skipped(live):
    def ask(acceleration):
        body = {"prompt": "a blue square", "seed": 1, "size": "64x64", "num_inference_steps": 12,
                "acceleration": acceleration}
        response = httpx.post(live.url + "/v1/images/generations", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    plain, same, skipping = ask("off"), ask("abcache:interval=1"), ask("abcache:warmup=2,interval=3")
    assert plain["data"][0]["b64_json"] == same["data"][0]["b64_json"]
    assert same["acceleration"]["block_fraction_computed"] == 1.0
    assert skipping["acceleration"]["block_fraction_computed"] < 1.0
    assert skipping["data"][0]["b64_json"] != plain["data"][0]["b64_json"]
    assert {"queue_ms", "run_ms"} <= set(plain["timings"])


def test_quality_maps_to_presets(live):
    body = {"prompt": "x", "seed": 1, **SMALL, "quality": "low"}
    data = httpx.post(live.url + "/v1/images/generations", json=body, timeout=60).json()
    from accel.presets import PRESETS

    assert data["acceleration"]["methods"][0].split(":")[0] == PRESETS["fast"][0]["method"]


def test_video_job_lifecycle_with_the_openai_client(live, client):
    job = client.videos.create(model="tiny-wan", prompt="a ball rolls", size="32x32",
                               extra_body={"num_frames": 5, "num_inference_steps": 30, "seed": 2})
    assert job.status in ("queued", "in_progress")
    seen = []
    deadline = time.time() + 120
    while time.time() < deadline:
        job = client.videos.retrieve(job.id)
        seen.append(job.progress)
        if job.status in ("completed", "failed"):
            break
        time.sleep(0.05)
    assert job.status == "completed", job
    assert seen == sorted(seen) and seen[-1] == 100
    content = client.videos.download_content(job.id).content
    import imageio.v3 as iio

    frames = iio.imread(content, extension=".mp4")
    assert len(frames) == 5
    assert any(j.id == job.id for j in client.videos.list().data)


def _running_video(live, client, prompt: str, seed: int):
    """A 400-step video job that has made progress, and its work item."""
    job = client.videos.create(model="tiny-wan", prompt=prompt, size="32x32",
                               extra_body={"num_frames": 5, "num_inference_steps": 400, "seed": seed})
    deadline = time.time() + 60
    while client.videos.retrieve(job.id).progress < 3 and time.time() < deadline:
        time.sleep(0.02)
    return job, live.state.videos.items[job.id]


def _wait_done(item) -> None:
    deadline = time.time() + 30
    while not item.future.done() and time.time() < deadline:
        time.sleep(0.01)


def test_delete_mid_run_frees_the_worker_within_one_step(live, client):
    job, item = _running_video(live, client, "slow", seed=3)
    assert client.videos.delete(job.id).deleted
    with pytest.raises(Exception):
        client.videos.retrieve(job.id)  # 404: deleted
    _wait_done(item)
    record = item.record
    assert record.interrupted_at is not None
    assert record.interrupted_at - item.cancel_step <= 1  # counted in steps, not seconds
    assert record.interrupted_at < 400
    after = client.videos.create(model="tiny-wan", prompt="next", size="32x32",
                                 extra_body={"num_frames": 5, "num_inference_steps": 3, "seed": 4})
    for _ in range(600):
        after = client.videos.retrieve(after.id)
        if after.status == "completed":
            break
        time.sleep(0.05)
    assert after.status == "completed"


def test_batching_groups_compatible_requests_and_never_mixes(live, records):
    bodies = [{"prompt": f"shape {i}", "seed": i, "size": "64x64", "num_inference_steps": 4} for i in range(4)]
    bodies += [{"prompt": "other size", "seed": 9, "size": "96x64", "num_inference_steps": 4}]
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: httpx.post(live.url + "/v1/images/generations", json=b, timeout=60), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert max(r.size for r in records) >= 2  # compatible requests shared a pipeline call
    assert sum(r.size for r in records) == len(bodies)  # each request ran exactly once
    for record in records:  # the record key includes size/steps: a batch never mixes them
        assert len({record.key}) == 1
    odd = responses[-1].json()
    assert odd["size"] == "96x64" and odd["timings"]["batch_size"] == 1
    # a batched image equals the same request alone (per-image generators)
    alone = httpx.post(live.url + "/v1/images/generations", json=bodies[0], timeout=60).json()
    a = np.asarray(Image.open(io.BytesIO(png(alone["data"][0]["b64_json"]))), dtype=float)
    b = np.asarray(Image.open(io.BytesIO(png(responses[0].json()["data"][0]["b64_json"]))), dtype=float)
    assert np.abs(a - b).max() <= 1  # equal up to float rounding of batched matmuls


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "x", "model": "nope"}, 400, "model"),
        ({"prompt": "x", "model": "tiny-wan"}, 400, "model"),
        ({"prompt": "x", "size": "65x64"}, 400, "size"),
        ({"prompt": "x", "size": "big"}, 400, "size"),
        ({"prompt": "x", "size": "4096x4096"}, 400, "size"),
        ({"prompt": "x", "num_inference_steps": 5000}, 400, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps"),
        ({"prompt": "x", "acceleration": "sortblock:K=0"}, 400, "acceleration"),
        ({"prompt": "x", "acceleration": "warp-drive"}, 400, "acceleration"),
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"prompt": "x", "n": 99}, 400, "n"),
        ({"prompt": "x" * 5000}, 400, "prompt"),
        ({"prompt": ""}, 400, "prompt"),
        ({}, 400, "prompt"),
        ({"prompt": "x", "response_format": "url"}, 400, "response_format"),
        ({"prompt": "x", "output_format": "gif"}, 400, "output_format"),
        ({"prompt": "x", "unknown_field": 1}, 400, "unknown_field"),
        ({"prompt": "x", "seed": -1}, 400, "seed"),
        ({"prompt": "x", "true_cfg_scale": 0.5}, 400, "true_cfg_scale"),
    ],
)
def test_bad_image_requests_get_4xx_naming_the_field(live, body, status, param):
    response = httpx.post(live.url + "/v1/images/generations", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_malformed_and_oversized_bodies(live):
    response = httpx.post(live.url + "/v1/images/generations", content=b'{"prompt": ', timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]["message"]
    response = httpx.post(live.url + "/v1/images/generations", content=b"x" * 2_000_000, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "model": "tiny-flux"}, "model"),
        ({"prompt": "x", "num_frames": 500}, "num_frames"),
        ({"prompt": "x", "num_frames": 6}, "num_frames"),
        ({"prompt": "x", "seconds": "soon"}, "seconds"),
        ({"prompt": "x", "size": "33x32"}, "size"),
        ({"prompt": "x", "acceleration": {"method": "abcache", "order": 9}}, "acceleration"),
        ({"prompt": "x", "input_reference": "file.png"}, "input_reference"),
    ],
)
def test_bad_video_requests_get_4xx(live, body, param):
    response = httpx.post(live.url + "/v1/videos", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_unknown_and_unready_videos(live):
    assert httpx.get(live.url + "/v1/videos/video_nope", timeout=10).status_code == 404
    assert httpx.delete(live.url + "/v1/videos/video_nope", timeout=10).status_code == 404
    job = httpx.post(live.url + "/v1/videos", json={"prompt": "x", "size": "32x32", "num_frames": 5,
                                                    "num_inference_steps": 200}, timeout=10).json()
    assert httpx.get(live.url + f"/v1/videos/{job['id']}/content", timeout=10).status_code == 409
    httpx.delete(live.url + f"/v1/videos/{job['id']}", timeout=10)


def _assert_next_record_interrupted(records: list, steps: int) -> None:
    """The engine's next batch record appears within 30 s, stopped before ``steps``."""
    deadline = time.time() + 30
    while not records and time.time() < deadline:
        time.sleep(0.05)
    record = records[-1]
    assert record.interrupted_at is not None and record.interrupted_at < steps


def test_timeout_gives_504_and_stops_the_work(live, records):
    body = {"prompt": "x", "size": "64x64", "num_inference_steps": 100, "timeout": 0.3, "seed": 5,
            "acceleration": "off"}
    response = httpx.post(live.url + "/v1/images/generations", json=body, timeout=60)
    assert response.status_code == 504
    _assert_next_record_interrupted(records, steps=100)


def test_client_disconnect_cancels_its_work(live, records):
    body = {"prompt": "gone", "size": "64x64", "num_inference_steps": 500, "seed": 6}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/images/generations", json=body, timeout=0.5)
    _assert_next_record_interrupted(records, steps=500)


def test_listings_health_and_metrics(live):
    for seed in range(3):
        body = {"prompt": "x", "seed": seed, **SMALL, "acceleration": "abcache:warmup=1,interval=2"}
        assert httpx.post(live.url + "/v1/images/generations", json=body, timeout=60).status_code == 200
    httpx.post(live.url + "/v1/images/generations", json={"prompt": "x", "size": "1x1"}, timeout=60)
    models = httpx.get(live.url + "/v1/models").json()["data"]
    assert {m["id"] for m in models} == {"tiny-flux", "tiny-wan"}
    accelerators = httpx.get(live.url + "/v1/accelerators").json()
    assert {"sortblock", "abcache", "fbcache"} <= set(accelerators["methods"])
    assert "properties" in accelerators["methods"]["sortblock"]["schema"]
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    assert httpx.get(live.url + "/ready").status_code == 200
    assert "/v1/images/generations" in httpx.get(live.url + "/openapi.json").json()["paths"]
    text = httpx.get(live.url + "/metrics").text
    for series in ["accel_requests_total", "accel_queue_depth", "accel_running", "accel_batch_size_bucket",
                   "accel_queue_seconds_bucket", "accel_run_seconds_bucket", "accel_block_skip_ratio_bucket",
                   "accel_estimated_time_saved_seconds_total", "accel_errors_total", "accel_model_load_seconds"]:
        assert series in text, series
    line = next(l for l in text.splitlines() if l.startswith('accel_requests_total{endpoint="/v1/images/generations",status="200"}'))
    assert float(line.split()[-1]) >= 3
    skip = next(l for l in text.splitlines() if l.startswith('accel_block_skip_ratio_count{method="abcache"}'))
    assert float(skip.split()[-1]) >= 3
    saved = next(l for l in text.splitlines() if l.startswith('accel_estimated_time_saved_seconds_total{method="abcache"}'))
    assert float(saved.split()[-1]) > 0
    load = next(l for l in text.splitlines() if l.startswith('accel_model_load_seconds{model="tiny-flux"}'))
    assert float(load.split()[-1]) > 0


def test_overload_gets_429_at_once_and_loses_nothing(monkeypatch):
    with LiveServer(models=[{"id": "tiny-flux", "source": "tiny-flux"}], queue_size=2, max_batch_size=1,
                    max_batch_wait_ms=0) as server:
        records = record_batches(server.state.engine, monkeypatch)
        body = {"prompt": "x", "size": "64x64", "num_inference_steps": 40, "acceleration": "off"}

        def post(i):
            start = time.perf_counter()
            r = httpx.post(server.url + "/v1/images/generations", json={**body, "seed": i}, timeout=120)
            return r, time.perf_counter() - start

        with cf.ThreadPoolExecutor(10) as pool:
            results = list(pool.map(post, range(10)))
        accepted = [r for r, _ in results if r.status_code == 200]
        rejected = [(r, t) for r, t in results if r.status_code == 429]
        assert len(accepted) + len(rejected) == 10 and rejected and accepted
        assert all(r.headers.get("retry-after") for r, _ in rejected)
        assert all(t < 2.0 for _, t in rejected)  # refused at once, not after waiting
        assert len({r.json()["seed"] for r in accepted}) == len(accepted)  # none duplicated
        assert sum(rec.size for rec in records) == len(accepted)  # each ran exactly once


def test_api_keys():
    with LiveServer(models=[{"id": "tiny-flux", "source": "tiny-flux"}], api_keys=["s3cret"]) as server:
        url = server.url + "/v1/models"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200
        client = OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert client.images.generate(prompt="x", size="64x64", extra_body={"num_inference_steps": 2}).data


def test_a_spec_is_parsed_once_and_equal_specs_batch_together(live, records, monkeypatch):
    """One spec written three ways: each request's spec is parsed once (at the route, one item each) into one
    canonical key, so the three may share a batch; the engine gets the route's AccelSpec object itself, and the
    pipeline call is assembled once per batch."""
    import accel.generate
    import accel.spec

    parsed, assembled, submitted, ran = [], [], [], []
    validate_one, pipeline_kwargs = accel.spec.validate_one, accel.generate.pipeline_kwargs
    submit, run = live.state.scheduler.submit, live.state.engine.run

    def counting_validate(item, context=None):
        parsed.append(item)
        return validate_one(item, context)

    def counting_kwargs(pipe, batch):
        assembled.append(len(batch))
        return pipeline_kwargs(pipe, batch)

    def spying_submit(item):
        submitted.append(item)
        return submit(item)

    def spying_run(model, batch, spec, should_stop):
        ran.append(spec)
        return run(model, batch, spec, should_stop)

    monkeypatch.setattr(accel.spec, "validate_one", counting_validate)
    monkeypatch.setattr(accel.generate, "pipeline_kwargs", counting_kwargs)
    monkeypatch.setattr(live.state.scheduler, "submit", spying_submit)
    monkeypatch.setattr(live.state.engine, "run", spying_run)
    specs = ["abcache:warmup=2,interval=3", {"method": "abcache", "interval": 3, "warmup": 2, "order": 2},
             ["abcache:interval=3,warmup=2"]]
    bodies = [{"prompt": f"same spec {i}", "seed": i, **SMALL, "acceleration": spec} for i, spec in enumerate(specs)]
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: httpx.post(live.url + "/v1/images/generations", json=b, timeout=60), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert len(parsed) == len(specs)  # once per request, never again in the scheduler, engine or generate
    assert len({item.spec.key for item in submitted}) == 1 and len({r.key for r in records}) == 1
    assert max(r.size for r in records) >= 2  # equal specs shared a pipeline call
    assert all(any(spec is item.spec for item in submitted) for spec in ran)
    assert assembled == [r.size for r in records]  # pipeline kwargs built once per batch


def test_a_job_deleted_elsewhere_is_cancelled_through_the_scheduler(live, client, monkeypatch):
    """A running job whose record vanished from the store (a DELETE on another replica) stops within one step,
    cancelled by `scheduler.cancel` like every other cancellation."""
    cancelled, cancel = [], live.state.scheduler.cancel

    def spying_cancel(item):
        cancelled.append(item)
        cancel(item)

    monkeypatch.setattr(live.state.scheduler, "cancel", spying_cancel)
    job, item = _running_video(live, client, "elsewhere", seed=8)
    assert live.state.videos.store.delete(job.id)  # as another replica's DELETE does: the store only
    _wait_done(item)
    assert cancelled == [item]
    assert item.record.interrupted_at is not None and item.record.interrupted_at - item.cancel_step <= 1


def test_data_dependent_specs_are_never_batched(live, records):
    """Sortblock ranks blocks once per batch (`batch_invariant` False): such requests run alone, so an output never
    depends on who else was in its batch."""
    bodies = [{"prompt": f"shape {i}", "seed": i, **SMALL, "acceleration": "sortblock:K=2"} for i in range(4)]
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: httpx.post(live.url + "/v1/images/generations", json=b, timeout=60), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert [r.size for r in records] == [1, 1, 1, 1]
