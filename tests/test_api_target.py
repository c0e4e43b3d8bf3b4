"""Fidelity targets over HTTP: the chosen spec and expected PSNR in the response, quality levels as targets, a 4xx
naming how to calibrate for a model without a profile, calibration on first load with progress on /ready, and the
estimate metric."""

import threading
import time

import httpx
import pytest

from accel.calibration.profile import builtin_profile_path, load_profile
from accel.loading import make_model
from server_fixtures import LiveServer

SMALL = {"num_inference_steps": 8}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    plain_dir = make_model("tiny-flux", tmp_path_factory.mktemp("m") / "tiny-flux-dir")  # no profile fits a dir
    with LiveServer(models=[{"id": "tiny-flux", "source": "tiny-flux"},
                            {"id": "uncalibrated", "source": str(plain_dir)}], warmup=False) as server:
        yield server


def post(live, **body):
    return httpx.post(live.url + "/v1/images/generations", json={"prompt": "a red circle", **body}, timeout=120)


def test_target_response_says_chosen_spec_and_expected_fidelity(live):
    answer = post(live, model="tiny-flux", acceleration={"target": {"psnr": 40}}, seed=1, **SMALL)
    assert answer.status_code == 200, answer.text
    acceleration = answer.json()["acceleration"]
    target = acceleration["target"]
    assert target["target"] == {"psnr": 40.0, "guard": True}
    assert target["expected_psnr"]["p10"] >= 40 and target["expected_psnr"]["median"] >= target["expected_psnr"]["p10"]
    assert target["expected_speedup"] > 0 and target["met"] is True
    bucket = load_profile(builtin_profile_path("tiny-flux")).buckets[0]
    assert target["chosen"] in {s.spec for s in bucket.settings}
    assert "psnr" in acceleration["estimate"]
    # the same body through the library gives the same image (the target resolves the same way)
    again = post(live, model="tiny-flux", acceleration="target:psnr=40", seed=1, **SMALL)
    assert again.json()["data"] == answer.json()["data"]
    metrics = httpx.get(live.url + "/metrics").text
    assert 'accel_estimated_psnr_count{model="tiny-flux"}' in metrics


def test_unmeetable_target_gets_closest_setting_and_a_note(live):
    answer = post(live, model="tiny-flux", acceleration={"target": {"speedup": 90}}, **SMALL)
    assert answer.status_code == 200
    target = answer.json()["acceleration"]["target"]
    assert target["met"] is False and "no calibrated setting reaches a 90x speedup" in target["note"]


def test_quality_levels_are_targets_on_a_calibrated_model(live):
    answer = post(live, model="tiny-flux", quality="high", **SMALL)
    assert answer.json()["acceleration"]["target"]["target"]["psnr"] == 40.0
    accelerators = httpx.get(live.url + "/v1/accelerators").json()
    assert accelerators["quality_to_target"]["low"] == {"psnr": 30.0}
    # a model without a profile keeps the presets
    plain = post(live, model="uncalibrated", quality="high", **SMALL)
    assert plain.status_code == 200 and "target" not in plain.json()["acceleration"]


def test_target_on_a_model_without_profile_is_a_400_naming_how_to_calibrate(live):
    answer = post(live, model="uncalibrated", acceleration={"target": {"psnr": 35}}, **SMALL)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "acceleration" and error["code"] == "model_not_calibrated"
    assert "accel calibrate --model" in error["message"] and "calibrate: true" in error["message"]
    bad = post(live, model="tiny-flux", acceleration={"target": {"psnr": 500}}, **SMALL)
    assert bad.status_code == 400 and "target.psnr" in bad.json()["error"]["message"]


def test_calibration_on_first_load_reports_progress_and_is_cached(tmp_path, monkeypatch):
    import accel.calibration.calibrate as calibration

    real = calibration.default_sweep
    monkeypatch.setattr(calibration, "default_sweep",
                        lambda pipe: [s for s in real(pipe) if s[1] in ("abcache_adaptive:tolerance=0.2",
                                                                        "abcache:interval=3,order=2")])
    monkeypatch.setattr(calibration, "default_prompts", lambda model, count: ["a red circle", "a blue square"])
    source = make_model("tiny-flux", tmp_path / "model")
    settings = dict(models=[{"id": "mine", "source": str(source), "calibrate": True}],
                    calibration_dir=str(tmp_path / "profiles"), warmup=False)
    seen = []
    server = LiveServer(**settings)
    engine = server.state.engine
    original = engine._calibration

    def slow_progress(model, pipe):  # record what /ready says while calibrating
        done = threading.Event()

        def poll():
            while not done.is_set():
                body = httpx.get(server.url + "/ready").json()
                seen.append(body)
                time.sleep(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            original(model, pipe)
        finally:
            done.set()
            poller.join()

    engine._calibration = slow_progress
    with server:
        answer = httpx.post(server.url + "/v1/images/generations", timeout=120,
                            json={"prompt": "a red circle", "acceleration": {"target": {"psnr": 30}}})
        assert answer.status_code == 200, answer.text
    assert (tmp_path / "profiles" / "mine.json").is_file()
    calibrating = [b for b in seen if b.get("reason") == "calibrating"]
    assert calibrating and calibrating[-1]["progress"]["model"] == "mine"
    assert {"done", "total"} <= set(calibrating[-1]["progress"])
    # a restart finds the kept profile: no new calibration
    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    with LiveServer(**settings) as again:
        assert again.state.engine.models["mine"].pipe.accel_profile is not None
