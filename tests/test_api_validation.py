"""The API surface over real HTTP: no request names a file, bad input is a 4xx naming the field (never a 500),
the server's limits and method policy hold for defaults and presets too, bodies are strict, and the OpenAPI
document describes what the server does."""

import json

import httpx
import pytest

from accel.errors import AccelError
from accel.pruning.importance import calibrate
from server.engine import Engine
from server.settings import ServerSettings, SettingsError, load_settings
from server_fixtures import LiveServer

IMAGES, VIDEOS = "/v1/images/generations", "/v1/videos"
TINY = {"size": "64x64", "num_inference_steps": 2}  # within the limits below
TINY_VIDEO = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def plan_file(load, tmp_path_factory):
    plan = calibrate(load("tiny-flux"), ["a red circle"], steps=2, seeds=1, progress=False, height=64, width=64)
    return plan.save(tmp_path_factory.mktemp("plan") / "plan.json")


@pytest.fixture(scope="module")
def live(plan_file):
    models = [{"id": "tiny-flux", "source": "tiny-flux", "prune_plans": {"third": str(plan_file)}},
              {"id": "tiny-wan", "source": "tiny-wan"}]
    with LiveServer(models=models, warmup=False, max_steps=3, max_frames=9, max_pixels=64 * 64,
                    allowed_methods=["abcache", "sparse_attention", "prune"],
                    method_limits={"sparse_attention": {"sparsity": [0.5, 0.9]}}) as server:
        yield server


def post(live, path, **kwargs) -> httpx.Response:
    return httpx.post(live.url + path, timeout=60, **kwargs)


def assert_refused(response: httpx.Response, param: str | None, status: int = 400, says: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error
    return error


# -- 1: a request never names a file -----------------------------------------------------------------------------
@pytest.mark.parametrize("path, extra", [(IMAGES, TINY), (VIDEOS, TINY_VIDEO)])
def test_a_request_cannot_name_a_plan_file(live, plan_file, path, extra):
    for spec in ("prune:plan=/etc/shadow", {"method": "prune", "plan": str(plan_file), "ratio": 0.3}):
        response = post(live, path, json={"prompt": "x", "acceleration": spec, **extra})
        assert_refused(response, "acceleration", says="never a path")


def test_a_configured_plan_is_named_and_listed(live):
    body = {"prompt": "x", "acceleration": "prune:plan=third,ratio=0.3", **TINY}
    response = post(live, IMAGES, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["acceleration"]["details"]["prune"]["pruned"]
    cards = {card["id"]: card for card in httpx.get(live.url + "/v1/models").json()["data"]}
    assert cards["tiny-flux"]["prune_plans"] == ["third"] and cards["tiny-wan"]["prune_plans"] == []


def test_a_plan_file_that_is_not_a_plan_stops_the_start_up(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"blocks": [1, 2]}))
    settings = ServerSettings(models=[{"id": "f", "source": "tiny-flux", "prune_plans": {"oops": str(bad)}}],
                              warmup=False)
    with pytest.raises(AccelError, match="model f: prune plan.*not a plan file"):
        Engine(settings).load()


# -- 3: bad input is a 4xx, never a 500 --------------------------------------------------------------------------
@pytest.mark.parametrize("seconds", ["nan", "inf", "1e308", 1e308, "-1", "٣"])
def test_bad_seconds_are_400_in_json_and_multipart(live, seconds):
    assert_refused(post(live, VIDEOS, json={"prompt": "x", "seconds": seconds}), "seconds")
    form = {"prompt": (None, "x"), "seconds": (None, str(seconds))}
    assert_refused(post(live, VIDEOS, files=form), "seconds")


def test_nan_literals_are_not_json(live):
    response = post(live, VIDEOS, content=b'{"prompt": "x", "seconds": NaN}',
                    headers={"content-type": "application/json"})
    assert_refused(response, None, says="NaN")


@pytest.mark.parametrize("spec", [{"method": []}, {"method": {}}, [{"method": 3}], {"K": 1}, 7])
def test_specs_of_the_wrong_shape_are_400(live, spec):
    assert_refused(post(live, IMAGES, json={"prompt": "x", "acceleration": spec}), "acceleration")


@pytest.mark.parametrize("depth", [40, 500, 3000])
@pytest.mark.parametrize("path", [IMAGES, VIDEOS])
def test_deeply_nested_bodies_are_400(live, path, depth):
    body = b'{"prompt": "x", "acceleration": ' + b"[" * depth + b"]" * depth + b"}"
    response = post(live, path, content=body, headers={"content-type": "application/json"})
    assert_refused(response, None, says="nested")


def test_a_deeply_nested_shorthand_is_400(live):
    spec = "sparse_attention:layers=" + "[" * 490 + "]" * 490
    assert_refused(post(live, IMAGES, json={"prompt": "x", "acceleration": spec, **TINY}), "acceleration")


# -- 5: limits on what runs, and the methods a request may use ---------------------------------------------------
def test_limits_apply_to_the_models_defaults(live):
    """tiny-flux runs 8 steps at 128x128 by default: over max_steps=3 and max_pixels=64x64 unless asked for."""
    assert_refused(post(live, IMAGES, json={"prompt": "x", "size": "64x64"}), "num_inference_steps",
                   says="limit of 3")
    assert_refused(post(live, IMAGES, json={"prompt": "x", "num_inference_steps": 2}), "size", says="128x128")
    assert_refused(post(live, VIDEOS, json={"prompt": "x", "seconds": "2", "num_inference_steps": 2}), "seconds")
    assert post(live, IMAGES, json={"prompt": "x", **TINY}).status_code == 200


def test_only_allowed_methods_and_knob_ranges(live):
    cases = [("sortblock", "acceleration.sortblock"), ("fbcache:threshold=0.1", "acceleration.fbcache"),
             ("sparse_attention:sparsity=0.95", "acceleration.sparse_attention.sparsity"),
             ({"method": "sparse_attention", "sparsity": 0.2}, "acceleration.sparse_attention.sparsity")]
    for spec, named in cases:
        assert_refused(post(live, IMAGES, json={"prompt": "x", "acceleration": spec, **TINY}), "acceleration",
                       says=named)
    # the preset "quality" uses abcache_adaptive, which is not allowed here: refused the same way
    assert_refused(post(live, IMAGES, json={"prompt": "x", "acceleration": "quality", **TINY}), "acceleration",
                   says="acceleration.abcache_adaptive")
    # tiny-flux has a calibrated profile: `quality` is a fidelity target, chosen among the allowed methods only
    chosen = post(live, IMAGES, json={"prompt": "x", "quality": "high", **TINY}).json()["acceleration"]["target"]
    assert chosen["chosen"].split(":")[0] in {"abcache", "sparse_attention", "prune"}
    assert post(live, IMAGES, json={"prompt": "x", "acceleration": "abcache", **TINY}).status_code == 200
    listing = httpx.get(live.url + "/v1/accelerators").json()
    assert set(listing["methods"]) == {"abcache", "sparse_attention", "prune"}
    assert listing["methods"]["sparse_attention"]["limits"] == {"sparsity": [0.5, 0.9]}
    assert "quality" not in listing["presets"] and "fast" not in listing["presets"] and "off" in listing["presets"]
    assert "high" not in listing["quality_to_preset"]


def test_method_settings_are_checked_at_start_up():
    with pytest.raises(SettingsError, match="warp"):
        load_settings(allowed_methods=["warp"])
    with pytest.raises(SettingsError, match="no knob"):
        load_settings(method_limits={"sparse_attention": {"speed": [0, 1]}})
    with pytest.raises(SettingsError, match="not allowed"):
        load_settings(allowed_methods=["abcache"], models=[{"id": "m", "source": "tiny-flux",
                                                            "default_preset": "quality"}])
    with pytest.raises(SettingsError, match="unknown plan"):
        load_settings(models=[{"id": "m", "source": "tiny-flux", "default_preset": "prune:plan=/etc/shadow"}])


# -- 6: strict bodies --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("size", "٦٤x٦٤"), ("size", "1" * 5000 + "x64"), ("size", "0x64"), ("n", "2"), ("n", True), ("seed", False),
    ("num_inference_steps", 2.0), ("model", ""), ("guidance_scale", True),
])
def test_image_fields_are_strict(live, field, value):
    error = assert_refused(post(live, IMAGES, json={"prompt": "x", **TINY, field: value}), field)
    assert "sys.set_int_max_str_digits" not in error["message"]


@pytest.mark.parametrize("field, value", [("num_frames", True), ("fps", "8"), ("seconds", True)])
def test_video_fields_are_strict(live, field, value):
    assert_refused(post(live, VIDEOS, json={"prompt": "x", field: value}), field)


@pytest.mark.parametrize("acceleration, says", [
    ({"method": "abcache", "correct": True}, "abcache.correct: needs a scheduler"),  # tiny-wan: UniPC
    ({"method": "abcache", "expert": "low"}, "abcache.expert: 'low' needs a pipeline with two experts"),
])
def test_a_video_job_the_model_cannot_run_is_refused_at_submission(live, acceleration, says):
    """Refused when it arrives (a 400), not accepted as a job that then fails: the session's own checks
    (`accel.session.refuse_unsupported`) run on the request."""
    body = {"model": "tiny-wan", "prompt": "x", "size": "32x32", "num_frames": 5, "num_inference_steps": 2,
            "acceleration": acceleration}
    assert_refused(post(live, VIDEOS, json=body), "acceleration", says=says)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_json_is_utf8_without_a_bom(live, encoding):
    body = json.dumps({"prompt": "x", **TINY}).encode(encoding)
    response = post(live, IMAGES, content=body, headers={"content-type": "application/json"})
    assert_refused(response, None)


def test_multipart_fields_are_utf8_text_and_converted(live):
    assert_refused(post(live, VIDEOS, files={"prompt": (None, b"caf\xe9")}), "prompt", says="UTF-8")
    assert_refused(post(live, VIDEOS, files={"prompt": (None, "x"), "num_frames": (None, "٥")}), "num_frames")
    form = {"prompt": (None, "x"), "size": (None, "32x32"), "num_frames": (None, "5"),
            "num_inference_steps": (None, "2"), "acceleration": (None, '{"method": "abcache"}')}
    response = post(live, VIDEOS, files=form)
    assert response.status_code == 200, response.text
    httpx.delete(live.url + f"/v1/videos/{response.json()['id']}")


@pytest.mark.parametrize("path, accepted", [(IMAGES, "application/json"), (VIDEOS, "multipart/form-data")])
@pytest.mark.parametrize("kwargs", [{"content": b"prompt=x", "headers": {"content-type": "text/plain"}},
                                    {"data": {"prompt": "x"}}, {"content": b'{"prompt": "x"}'}])
def test_other_content_types_are_415_naming_what_is_accepted(live, path, accepted, kwargs):
    assert_refused(post(live, path, **kwargs), None, status=415, says=accepted)


# -- 7: the OpenAPI document describes the server ----------------------------------------------------------------
def test_openapi_describes_bodies_statuses_and_security(live):
    doc = httpx.get(live.url + "/openapi.json").json()
    create = doc["paths"]["/v1/videos"]["post"]
    assert set(create["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert doc["paths"][IMAGES]["post"]["requestBody"]["content"]["application/json"]
    assert set(create["responses"]["200"]["links"]) == {"GetVideo", "GetVideoContent", "DeleteVideo"}
    statuses = {code for ops in doc["paths"].values() for op in ops.values() for code in op["responses"]}
    assert {"400", "401", "404", "409", "413", "415", "429", "503", "504"} <= statuses and "422" not in statuses
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert create["security"] == [{"HTTPBearer": []}] and "security" not in doc["paths"]["/health"]["get"]
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    image_request = doc["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert image_request["response_format"]["const"] == "b64_json"  # no "url": not served


def test_options_lists_every_method_of_the_path(live):
    assert httpx.options(live.url + "/v1/videos").headers["allow"] == "GET, HEAD, POST"
    assert httpx.options(live.url + "/v1/videos/abc").headers["allow"] == "DELETE, GET, HEAD"


def test_docs_pages_are_off_unless_enabled(live):
    assert httpx.get(live.url + "/docs").status_code == 404
    assert httpx.get(live.url + "/redoc").status_code == 404
    with LiveServer(models=[{"id": "tiny-flux", "source": "tiny-flux"}], warmup=False, api_docs=True) as server:
        assert httpx.get(server.url + "/docs").status_code == 200
        # -- 8: a server without a video model says so
        response = httpx.post(server.url + VIDEOS, json={"prompt": "x"}, timeout=30)
        error = assert_refused(response, "model", says="no text-to-video model")
        assert "None" not in error["message"]
