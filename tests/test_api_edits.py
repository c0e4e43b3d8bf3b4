"""Image editing (`POST /v1/images/edits`) and image-to-video (`input_reference` on `POST /v1/videos`) over real
HTTP, and the input images in the library (`GenerationParams.images`): an edit through the server is the plain
diffusers call bit for bit, accelerators apply to edits, requests with input images never share a pipeline call,
and every bad upload or wrong task is a 400 naming its field."""

import base64
import concurrent.futures
import io
import struct
import time
import zlib

import httpx
import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from accel.errors import GenerationParamsError
from accel.generate import GenerationParams, batch_key, generate, model_info, pipeline_kwargs, resolve_params
from accel.io import to_uint8
from accel.models.registry import build_pipeline
from server.jobs import MemoryJobStore, RedisJobStore, VideoJob
from server_fixtures import LiveServer
from test_jobs_redis import redis_url  # noqa: F401 - the real redis-server fixture

EDITS, VIDEOS = "/v1/images/edits", "/v1/videos"
SMALL = {"size": "64x64", "num_inference_steps": "2"}  # form fields: text


def png(width=64, height=64, seed=0, fmt="PNG") -> bytes:
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims `width` x `height` (a decompression bomb's header)."""
    data = bytearray(png(16, 16))
    ihdr = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def form(*images: bytes, name="image", **fields) -> list:
    """A multipart form: the images as files of field `name`, the fields as text."""
    parts = [(name, (f"in{i}.png", image, "image/png")) for i, image in enumerate(images)]
    return parts + [(key, (None, str(value))) for key, value in {"prompt": "make it red", **fields}.items()]


def decoded(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def assert_refused(response: httpx.Response, param: str | None, says: str = "", status: int = 400) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error


@pytest.fixture(scope="module")
def live():
    models = [{"id": "kontext", "source": "tiny-flux-kontext"}, {"id": "tiny-flux", "source": "tiny-flux"},
              {"id": "tiny-wan", "source": "tiny-wan"}, {"id": "flux2", "source": "tiny-flux2"}]
    with LiveServer(models=models, warmup=False, max_input_images=2, max_input_pixels=128 * 128,
                    max_batch_wait_ms=1500, max_steps=8) as server:
        yield server


def post(live, path, **kwargs) -> httpx.Response:
    return httpx.post(live.url + path, timeout=120, **kwargs)


# -- the library ------------------------------------------------------------------------------------------------
def test_the_model_says_what_inputs_it_takes(load):
    kontext, flux = load("tiny-flux-kontext"), load("tiny-flux")
    info = model_info(kontext)
    assert (info.task, info.tasks, info.max_images, info.needs_image) == ("image-edit", ("image-edit",), 1, True)
    assert (model_info(flux).tasks, model_info(flux).max_images) == (("text-to-image",), 0)
    image = Image.open(io.BytesIO(png()))
    cases = [(kontext, {}, "image", "needs an input image"),
             (kontext, {"images": [image, image]}, "image", "at most 1 input image"),
             (kontext, {"images": [image.resize((8, 8))]}, "image", "too small"),
             (kontext, {"images": [image], "mask": image}, "mask", "not supported by FluxKontextPipeline"),
             (flux, {"images": [image]}, "image", "takes no input image")]
    for pipe, inputs, field, says in cases:
        with pytest.raises(GenerationParamsError, match=says) as caught:
            resolve_params(pipe, GenerationParams.parse(prompt="x", **inputs))
        assert caught.value.field == field
    with pytest.raises(GenerationParamsError) as caught:
        GenerationParams.parse(prompt="x", images=["in.png"])  # a path is not an image
    assert caught.value.field == "images"


def test_requests_with_input_images_never_share_a_call(load):
    """The batching rule: a request with input images runs alone (a call conditions all its outputs on one set of
    images); its key differs from a text request's, and a batch of two is refused."""
    kontext = load("tiny-flux-kontext")
    edit = resolve_params(kontext, GenerationParams.parse(prompt="a", images=[Image.open(io.BytesIO(png()))]))
    same = resolve_params(kontext, GenerationParams.parse(prompt="b", images=[Image.open(io.BytesIO(png()))]))
    text = GenerationParams.parse(prompt="a", height=128, width=128, num_inference_steps=8, guidance_scale=3.5)
    assert batch_key(edit) != batch_key(text)
    with pytest.raises(GenerationParamsError, match="runs alone"):
        pipeline_kwargs(kontext, [edit, same])
    kwargs = pipeline_kwargs(kontext, [edit.model_copy(update={"num_outputs": 2})])
    assert kwargs["prompt"] == "a" and kwargs["num_images_per_prompt"] == 2 and len(kwargs["generator"]) == 2
    assert kwargs["image"] is edit.images[0] and kwargs["max_area"] == 128 * 128  # the requested size's area


# -- edits over HTTP ---------------------------------------------------------------------------------------------
def test_an_edit_through_the_server_is_the_plain_pipeline_call(live):
    """Bit for bit: the server's edit == FluxKontextPipeline called directly with the same image, seed and knobs."""
    source = png(80, 48, seed=3)
    response = post(live, EDITS, files=form(source, model="kontext", seed=7, **SMALL))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "64x64" and body["model"] == "kontext" and len(body["data"]) == 1

    plain = FluxKontextPipeline(**build_pipeline("tiny-flux-kontext").components)
    with torch.inference_mode():
        direct = plain(image=Image.open(io.BytesIO(source)).convert("RGB"), prompt="make it red", height=64,
                       width=64, max_area=64 * 64, num_inference_steps=2, guidance_scale=3.5,
                       _auto_resize=False,  # the built-in's default: no snapping to Kontext's ~1 MP resolutions
                       generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    assert np.array_equal(decoded(body["data"][0]["b64_json"]), to_uint8(direct))


def test_accelerators_apply_to_edits(live, load):
    """A spec in `acceleration` (JSON text in the form) runs on the edit: the server's output is the library's
    accelerated edit, bit for bit, and blocks were skipped."""
    source, spec = png(seed=4), {"method": "sortblock", "K": 2}
    fields = {"model": "kontext", "seed": 5, "size": "64x64", "num_inference_steps": 6,
              "acceleration": '{"method": "sortblock", "K": 2}'}
    response = post(live, EDITS, files=form(source, **fields))
    assert response.status_code == 200, response.text
    report = response.json()["acceleration"]
    assert report["methods"] == ["sortblock:K=2"] and report["block_fraction_computed"] < 1
    params = GenerationParams.parse(prompt="make it red", images=[Image.open(io.BytesIO(source))], seed=5,
                                    height=64, width=64, num_inference_steps=6)
    library = generate(load("tiny-flux-kontext"), params, spec)
    assert np.array_equal(decoded(response.json()["data"][0]["b64_json"]), to_uint8(library.images[0]))


def test_concurrent_edits_run_one_per_call(live):
    """Two identical edits sent together, with a batch wait long enough to join them, still run alone; `n` outputs
    of one edit come from one call and differ by seed."""
    def send(n):
        return post(live, EDITS, files=form(png(seed=6), model="kontext", seed=1, n=n, **SMALL))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(send, [1, 2]))
    for response in responses:
        assert response.status_code == 200, response.text
        assert response.json()["timings"]["batch_size"] == 1
    first, second = (decoded(d["b64_json"]) for d in responses[1].json()["data"])
    assert not np.array_equal(first, second)


def test_flux2_edits_with_reference_images_and_generates(live, load):
    """FLUX.2 serves both routes: an edit with two reference images is the library's edit bit for bit (the images
    reach the pipeline as a list, in order), and a plain generation still works; its own image checks are 400s."""
    first, second = png(64, 64, seed=10), png(96, 64, seed=11)
    fields = {"model": "flux2", "seed": 2, "size": "64x64", "num_inference_steps": 2}
    response = post(live, EDITS, files=form(first, second, **fields))
    assert response.status_code == 200, response.text
    images = [Image.open(io.BytesIO(data)) for data in (first, second)]
    params = GenerationParams.parse(prompt="make it red", images=images, seed=2, height=64, width=64,
                                    num_inference_steps=2)
    library = generate(load("tiny-flux2"), params)
    assert np.array_equal(decoded(response.json()["data"][0]["b64_json"]), to_uint8(library.images[0]))
    swapped = generate(load("tiny-flux2"), params.model_copy(update={"images": images[::-1]}))
    assert not np.array_equal(to_uint8(swapped.images[0]), to_uint8(library.images[0]))
    response = post(live, "/v1/images/generations", json={"prompt": "x", "model": "flux2", "size": "64x64",
                                                         "num_inference_steps": 2})
    assert response.status_code == 200, response.text
    assert_refused(post(live, EDITS, files=form(png(48, 48), **fields)), "image", "Image too small")


@pytest.mark.parametrize("files, param, says", [
    (form(), "image", "Field required"),
    ([("image", ("a.txt", b"just text", "image/png")), ("prompt", (None, "x"))], "image", "not a PNG, JPEG or WebP"),
    (form(png()[:300]), "image", "not a valid image"),
    (form(png(fmt="GIF")), "image", "not a PNG, JPEG or WebP"),
    (form(png(200, 100)), "image", "200x100 is more than this server's limit of 16384 pixels"),
    (form(png_claiming(100_000, 100_000)), "image", "more than this server's limit of 16384 pixels"),
    (form(png_claiming(3_000, 3_000)), "image", "3000x3000 is more than this server's limit"),
    (form(png(), png(), png()), "image", "3 images is more than this server's limit of 2"),
    (form(png(), png()), "image", "FluxKontextPipeline takes at most 1 input image"),
    (form(png(), png()[:100], name="image[]"), "image[1]", "not a valid image"),
    (form(png()) + [("mask", ("m.png", png(), "image/png"))], "mask", "mask: not supported by FluxKontextPipeline"),
    (form(png()) + [("mask", ("m.txt", b"nope", "text/plain"))], "mask", "not a PNG"),
    ([("image", (None, "https://example.com/a.png")), ("prompt", (None, "x"))], "image", "no URL or path is read"),
    (form(png(), model="tiny-flux"), "model", "serves text-to-image; use /v1/images/generations"),
    (form(png(), model="tiny-wan"), "model", "use /v1/videos"),
    (form(png(), n=9), "n", "at most"),
    (form(png(), size="65x64"), "size", "multiple of 16"),
    (form(png(), acceleration="nope:x=1"), "acceleration", ""),
    (form(png(), prompt="x") + [("prompt", (None, "y"))], "prompt", "given more than once"),
])
def test_bad_edits_are_400_naming_the_field(live, files, param, says):
    started = time.monotonic()
    assert_refused(post(live, EDITS, files=files), param, says)
    assert time.monotonic() - started < 10  # refused before any work, bombs included


def test_edit_bodies_are_multipart_within_the_body_limit(live):
    assert_refused(post(live, EDITS, json={"prompt": "x"}), None, "send multipart/form-data", status=415)
    big = png(8, 8) + b"\0" * 1_100_000  # past max_body_bytes (1 000 000): refused as it arrives
    response = post(live, EDITS, files=form(big))
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    truncated = b'--b0\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'  # no closing boundary
    response = post(live, EDITS, content=truncated, headers={"content-type": "multipart/form-data; boundary=b0"})
    assert_refused(response, None, "malformed multipart body")


def test_an_edit_model_is_not_a_generation_model(live):
    response = post(live, "/v1/images/generations", json={"prompt": "x", "model": "kontext"})
    assert_refused(response, "model", "serves image-edit; use /v1/images/edits")


def test_models_and_openapi_describe_edits(live):
    cards = {card["id"]: card for card in httpx.get(live.url + "/v1/models").json()["data"]}
    assert cards["kontext"]["tasks"] == ["image-edit"] and cards["kontext"]["max_input_images"] == 1
    assert cards["kontext"]["family"] == "flux" and cards["kontext"]["default_size"] == "128x128"
    assert cards["kontext"]["default_steps"] == 8
    assert cards["tiny-wan"]["tasks"] == ["text-to-video"] and cards["tiny-wan"]["max_input_images"] == 0
    assert cards["flux2"]["tasks"] == ["text-to-image", "image-edit"] and cards["flux2"]["max_input_images"] == 4
    doc = httpx.get(live.url + "/openapi.json").json()
    edit = doc["paths"][EDITS]["post"]
    assert set(edit["requestBody"]["content"]) == {"multipart/form-data"} and "415" in edit["responses"]
    schema = doc["components"]["schemas"]["ImageEditRequest"]
    assert schema["properties"]["image"]["items"]["format"] == "binary"
    assert schema["properties"]["image"]["maxItems"] == 2 and "image" in schema["required"]
    assert doc["components"]["schemas"]["VideoCreateRequest"]["properties"]["input_reference"]["format"] == "binary"


# -- image-to-video ----------------------------------------------------------------------------------------------
def test_input_reference_needs_an_image_to_video_model(live):
    video = {"size": "32x32", "num_frames": "5", "num_inference_steps": "2"}
    assert_refused(post(live, VIDEOS, files=form(png(), name="input_reference", **video)), "input_reference",
                   "takes no input image")
    assert_refused(post(live, VIDEOS, json={"prompt": "x", "input_reference": "/etc/passwd"}), "input_reference",
                   "no URL or path is read")
    bad = form(b"GIF89a", name="input_reference", **video)
    assert_refused(post(live, VIDEOS, files=bad), "input_reference", "not a PNG, JPEG or WebP")


def _i2v_or_skip():
    try:
        build_pipeline("tiny-wan22-i2v")
    except NotImplementedError as exc:
        pytest.skip(f"tiny-wan22-i2v is not built yet: {exc}")


def test_image_to_video_through_the_job_api():
    """An image-to-video job with `input_reference` gives an MP4; its image is kept in the job store only, and
    dropped with the job; without one the model answers 400 naming input_reference."""
    _i2v_or_skip()
    with LiveServer(models=[{"id": "i2v", "source": "tiny-wan22-i2v"}], warmup=True) as server:
        source = png(64, 64, seed=9)
        response = httpx.post(server.url + VIDEOS, files=form(source, name="input_reference", num_inference_steps=2,
                                                              seconds="0.3"), timeout=60)
        assert response.status_code == 200, response.text
        job = response.json()
        assert server.state.videos.store.get_input(job["id"]) == source
        deadline = time.time() + 120
        while job["status"] not in ("completed", "failed") and time.time() < deadline:
            time.sleep(0.2)
            job = httpx.get(server.url + f"{VIDEOS}/{job['id']}", timeout=10).json()
        assert job["status"] == "completed", job
        content = httpx.get(server.url + f"{VIDEOS}/{job['id']}/content", timeout=10)
        assert content.status_code == 200 and content.content[4:8] == b"ftyp"
        assert httpx.delete(server.url + f"{VIDEOS}/{job['id']}", timeout=10).status_code == 200
        assert server.state.videos.store.get_input(job["id"]) is None
        response = httpx.post(server.url + VIDEOS, json={"prompt": "x"}, timeout=60)
        assert_refused(response, "input_reference", "needs an input image")


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_the_store_keeps_the_input_with_its_job(kind, request):
    store = MemoryJobStore() if kind == "memory" else RedisJobStore(request.getfixturevalue("redis_url"),
                                                                  prefix=f"e{time.time_ns()}:")
    job = VideoJob(id="video_i", model="m", status="queued", created_at=int(time.time()), prompt="p", seconds="1",
                   size="32x32", num_frames=5, fps=8, seed=1)
    store.create(job, input_reference=b"png bytes")
    assert store.get_input(job.id) == b"png bytes"
    store.create(job.model_copy(update={"id": "video_t"}))
    assert store.get_input("video_t") is None
    assert store.delete(job.id) and store.get_input(job.id) is None
    store.close()


def test_cli_edits_an_image(tmp_path, capsys):
    from accel.cli import main

    (tmp_path / "in.png").write_bytes(png(seed=2))
    out = tmp_path / "out.png"
    with pytest.raises(SystemExit, match="--image .*missing.png"):
        main(["generate", "--model", "tiny-flux-kontext", "--image", str(tmp_path / "missing.png"), "--prompt", "x",
              "--out", str(out)])
    assert main(["generate", "--model", "tiny-flux-kontext", "--image", str(tmp_path / "in.png"), "--prompt", "x",
                 "--steps", "1", "--height", "64", "--width", "64", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
