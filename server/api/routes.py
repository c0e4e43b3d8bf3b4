"""Routes: validate a request completely (4xx naming the field) before it is admitted, then hand it to the
scheduler and wait; map outcomes to status codes."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import secrets
import time
import traceback
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from accel.errors import AccelError, SpecError
from accel.generate import GenerationParams, pipeline_kwargs
from accel.io import image_bytes, video_bytes
from accel.presets import PRESET_DESCRIPTIONS, PRESETS, QUALITY_TO_PRESET
from accel.spec import method_schemas, parse_spec

from server.api.errors import APIError, bad_request, error_body
from server.api.schemas import (
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    VideoCreateRequest,
    VideoDeleted,
    VideoJob,
    VideoList,
)
from server.jobs import MemoryJobStore
from server.scheduler import Cancelled, DeadlineExceeded, Draining, OutOfMemory, QueueFull, WorkItem

log = logging.getLogger("accel.server")
router = APIRouter()


def state(request: Request):
    return request.app.state.accel


async def require_api_key(request: Request) -> None:
    keys = state(request).settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    if not any(hmac.compare_digest(token.encode(), key.get_secret_value().encode()) for key in keys):
        raise APIError(401, "missing or invalid API key (Authorization: Bearer ...)", type="authentication_error",
                       headers={"WWW-Authenticate": "Bearer"})


# -- validation shared by images and videos ----------------------------------------------------------------------
def _model(app_state, model_id: str | None, task: str):
    models = app_state.engine.models
    if not models:
        raise APIError(503, "models are still loading", type="server_error")
    model_id = model_id or next((m for m, loaded in models.items() if loaded.task == task), None)
    if model_id not in models:
        raise APIError(400, f"model {model_id!r} is not served here; available: {', '.join(models)}",
                       param="model", code="model_not_found")
    loaded = models[model_id]
    if loaded.task != task:
        other = "/v1/videos" if loaded.task == "text-to-video" else "/v1/images/generations"
        raise bad_request(f"model {model_id!r} is a {loaded.task} model; use {other}", "model")
    return model_id, loaded


def _spec(body, loaded, quality: str | None = None) -> list[dict]:
    spec = body.acceleration
    if spec is None:
        spec = QUALITY_TO_PRESET.get(quality or "", loaded.settings.default_preset)
    try:
        return parse_spec(spec).to_json()
    except SpecError as exc:
        raise bad_request(str(exc), "acceleration") from None


def _params(app_state, body, loaded, **extra) -> tuple[GenerationParams, dict]:
    settings = app_state.settings
    if len(body.prompt) > settings.max_prompt_chars:
        raise bad_request(f"prompt: longer than {settings.max_prompt_chars} characters", "prompt")
    if body.negative_prompt and len(body.negative_prompt) > settings.max_prompt_chars:
        raise bad_request(f"negative_prompt: longer than {settings.max_prompt_chars} characters", "negative_prompt")
    if body.num_inference_steps is not None and body.num_inference_steps > settings.max_steps:
        raise bad_request(f"num_inference_steps: at most {settings.max_steps}", "num_inference_steps")
    width, height = body.dimensions()
    defaults = loaded.pipe.accel_defaults
    w, h = width or defaults.width, height or defaults.height
    if w and h and w * h > settings.max_pixels:
        raise bad_request(f"size: {w}x{h} is more than {settings.max_pixels} pixels", "size")
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    try:
        params = GenerationParams.parse(
            prompt=body.prompt, negative_prompt=body.negative_prompt, num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, true_cfg_scale=body.true_cfg_scale, height=height, width=width,
            seed=seed, **extra,
        )
        kwargs = pipeline_kwargs(loaded.pipe, [params])  # checks size multiples, frames, knobs the model lacks
    except AccelError as exc:
        field = str(exc).split(":")[0].strip()
        field = {"width": "size", "height": "size"}.get(field, field)
        raise bad_request(str(exc), field if field.isidentifier() else None) from None
    return params, kwargs


def _submit(app_state, item: WorkItem) -> asyncio.Future:
    try:
        return app_state.scheduler.submit(item)
    except QueueFull:
        raise APIError(429, "the queue is full; retry later", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(app_state.retry_after())}) from None
    except Draining:
        raise APIError(503, "the server is shutting down", type="server_error", headers={"Retry-After": "5"}) from None


def _failure(exc: BaseException, request_id: str) -> APIError:
    if isinstance(exc, DeadlineExceeded):
        return APIError(504, "the request did not finish before its deadline (timeout); its work was stopped",
                        type="timeout_error")
    if isinstance(exc, OutOfMemory):
        return APIError(503, "the device ran out of memory for this batch; retry with a smaller request",
                        type="server_error", code="out_of_memory")
    if isinstance(exc, AccelError):
        return bad_request(str(exc))
    log.error('{"event": "internal_error", "request_id": "%s", "error": %s, "traceback": %s}', request_id,
              json.dumps(str(exc)), json.dumps("".join(traceback.format_exception(exc))))
    return APIError(500, f"internal error (request id {request_id})", type="server_error")


# -- images ------------------------------------------------------------------------------------------------------
@router.post("/v1/images/generations", dependencies=[Depends(require_api_key)])
async def create_images(request: Request, body: ImageGenerationRequest):
    app_state = state(request)
    settings = app_state.settings
    model_id, loaded = _model(app_state, body.model, "text-to-image")
    if body.n > settings.max_n:
        raise bad_request(f"n: at most {settings.max_n} images per request", "n")
    if body.response_format == "url":
        raise bad_request("response_format: 'url' is not supported here; use 'b64_json'", "response_format")
    quality = None if body.quality in (None, "standard", "hd") else body.quality
    spec = _spec(body, loaded, quality)
    params, _ = _params(app_state, body, loaded, num_outputs=body.n)
    timeout = body.timeout or settings.request_timeout_s
    item = WorkItem(model=model_id, params=params, accel=spec, deadline=time.monotonic() + timeout)
    request.state.log.update(model=model_id, spec=spec, seed=params.seed, item=item.id)
    future = _submit(app_state, item)
    while not future.done():
        await asyncio.wait([future], timeout=0.1)
        if not future.done() and await request.is_disconnected():
            app_state.scheduler.cancel(item)  # the client is gone: stop its work
            request.state.log.update(outcome="client_disconnected")
            return Response(status_code=499)
    if future.exception() is not None:
        exc = future.exception()
        if isinstance(exc, Cancelled):
            return Response(status_code=499)
        raise _failure(exc, item.id)
    result = future.result()
    fmt = body.output_format
    data = [ImageData(b64_json=base64.b64encode(image_bytes(img, fmt, body.output_compression)).decode())
            for img in result.images]
    timings = {"queue_ms": round((item.started - item.enqueued) * 1000, 2),
               "run_ms": round((item.finished - item.started) * 1000, 2), "batch_size": item.batch_size}
    request.state.log.update(timings=timings)
    h, w = result.images.shape[1:3]
    return ImagesResponse(created=int(time.time()), data=data, output_format=fmt, size=f"{w}x{h}",
                          quality=body.quality, seed=params.seed, model=model_id,
                          acceleration=result.report, timings=timings)


# -- videos ------------------------------------------------------------------------------------------------------
async def _video_body(request: Request) -> VideoCreateRequest:
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data") or content_type.startswith("application/x-www-form"):
            form = await request.form()
            data: dict[str, Any] = {k: v for k, v in form.items()}
            if isinstance(data.get("acceleration"), str) and data["acceleration"][:1] in "[{":
                data["acceleration"] = json.loads(data["acceleration"])
        else:
            data = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"malformed JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    try:
        return VideoCreateRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise bad_request("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()), param) from None


def _frames(body: VideoCreateRequest, loaded, max_frames: int) -> tuple[int | None, int]:
    defaults = loaded.pipe.accel_defaults
    fps = body.fps or defaults.fps or 8
    frames = body.num_frames
    if frames is None and body.seconds is not None:
        try:
            seconds = float(body.seconds)
        except ValueError:
            raise bad_request("seconds: must be a number", "seconds") from None
        if seconds <= 0:
            raise bad_request("seconds: must be positive", "seconds")
        temporal = getattr(loaded.pipe, "vae_scale_factor_temporal", 1) or 1
        frames = max(1, round(seconds * fps / temporal)) * temporal + (1 if temporal > 1 else 0)
    frames = frames or defaults.num_frames
    if frames and frames > max_frames:
        raise bad_request(f"num_frames: {frames} frames is more than the limit of {max_frames}", "num_frames")
    return frames, fps


@router.post("/v1/videos", dependencies=[Depends(require_api_key)])
async def create_video(request: Request):
    app_state = state(request)
    body = await _video_body(request)
    model_id, loaded = _model(app_state, body.model, "text-to-video")
    spec = _spec(body, loaded)
    frames, fps = _frames(body, loaded, app_state.settings.max_frames)
    params, kwargs = _params(app_state, body, loaded, num_frames=frames)
    total_steps = kwargs.get("num_inference_steps") or 1
    now = int(time.time())
    job = VideoJob(id="video_" + secrets.token_hex(12), model=model_id, status="queued", created_at=now,
                   prompt=params.prompt, seconds=f"{kwargs['num_frames'] / fps:g}",
                   size=f"{kwargs['width']}x{kwargs['height']}", num_frames=kwargs["num_frames"], fps=fps,
                   seed=params.seed)
    timeout = body.timeout or app_state.settings.request_timeout_s
    item = WorkItem(model=model_id, params=params, accel=spec, deadline=time.monotonic() + timeout, kind="video")
    writer = _JobWriter(app_state.jobs, job)

    def on_start():
        if not writer.write(status="in_progress"):  # deleted (on any replica) before it started
            app_state.scheduler.cancel(item)

    def on_progress(step: int):  # in the engine's worker thread, after every step
        if not writer.write(progress=min(99, int(100 * step / total_steps))):
            item.cancelled, item.cancel_step = True, item.last_step  # deleted elsewhere: stop at this step

    item.on_start, item.on_progress = on_start, on_progress
    future = _submit(app_state, item)
    app_state.job_items[job.id] = item
    try:
        await _store(app_state, app_state.jobs.create, job)
    except Exception:
        app_state.job_items.pop(job.id, None)
        app_state.scheduler.cancel(item)
        raise
    asyncio.get_running_loop().create_task(_finish_video(app_state, writer, item, future))
    request.state.log.update(model=model_id, spec=spec, seed=params.seed, job=job.id)
    return job


class _JobWriter:
    """This replica's copy of a job it runs. Every change is a new copy written through the store; a write that
    the store refuses (the job was deleted, here or on another replica) answers False and the work stops."""

    def __init__(self, store, job: VideoJob):
        self.store, self.job = store, job

    def write(self, **changes) -> bool:
        self.job = self.job.model_copy(update=changes)
        try:
            return self.store.update(self.job)
        except Exception as exc:  # noqa: BLE001 - a store hiccup must not fail the job; the next step retries
            log.warning(json.dumps({"event": "job_store_error", "job": self.job.id, "error": str(exc)}))
            return True


async def _store(app_state, method, *args):
    """A store call off the event loop when the store is remote (Redis), inline when it is in this process."""
    if isinstance(app_state.jobs, MemoryJobStore):
        return method(*args)
    return await asyncio.to_thread(method, *args)


async def _finish_video(app_state, writer: _JobWriter, item: WorkItem, future: asyncio.Future) -> None:
    job_id = writer.job.id
    final: dict[str, Any] | None = None
    try:
        result = await future
        content = await asyncio.to_thread(video_bytes, result.videos[0], writer.job.fps)
        if await _store(app_state, app_state.jobs.put_content, job_id, content):
            final = {"status": "completed", "progress": 100, "acceleration": result.report}
    except Cancelled:
        final = {"status": "cancelled"}
    except BaseException as exc:  # noqa: BLE001 - a failed job records its error; the server keeps serving
        failure = _failure(exc, job_id)
        final = {"status": "failed", "error": {"code": failure.code or failure.type, "message": failure.message}}
    finally:
        app_state.job_items.pop(job_id, None)
    if final is not None:  # a deleted job stays deleted: the store refuses the write
        await asyncio.to_thread(writer.write, completed_at=int(time.time()), **final)


async def _job(app_state, video_id: str) -> VideoJob:
    job = await _store(app_state, app_state.jobs.get, video_id)
    if job is None:
        raise APIError(404, f"no video job {video_id!r}", type="not_found_error", param="video_id")
    return job


@router.get("/v1/videos", dependencies=[Depends(require_api_key)])
async def list_videos(request: Request) -> VideoList:
    app_state = state(request)
    return VideoList(data=await _store(app_state, app_state.jobs.list))


@router.get("/v1/videos/{video_id}", dependencies=[Depends(require_api_key)])
async def get_video(request: Request, video_id: str) -> VideoJob:
    return await _job(state(request), video_id)


@router.get("/v1/videos/{video_id}/content", dependencies=[Depends(require_api_key)])
async def get_video_content(request: Request, video_id: str, variant: str = "video"):
    app_state = state(request)
    job = await _job(app_state, video_id)
    if variant != "video":
        raise bad_request(f"variant: only 'video' is available, not {variant!r}", "variant")
    content = await _store(app_state, app_state.jobs.get_content, video_id)
    if job.status != "completed" or content is None:
        raise APIError(409, f"video {video_id} is not ready (status {job.status})", code="not_ready")
    return Response(content, media_type="video/mp4")


@router.delete("/v1/videos/{video_id}", dependencies=[Depends(require_api_key)])
async def delete_video(request: Request, video_id: str) -> VideoDeleted:
    """Deletes the job in the store and raises its cancel flag: the replica running it (this one or another)
    stops within one step; one where it still waits drops it within `job_poll_s`."""
    app_state = state(request)
    await _job(app_state, video_id)
    await _store(app_state, app_state.jobs.delete, video_id)
    item = app_state.job_items.get(video_id)
    if item is not None:
        app_state.scheduler.cancel(item)  # ours: a running batch stops within one step
    return VideoDeleted(id=video_id)


# -- listings and health -----------------------------------------------------------------------------------------
@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def list_models(request: Request) -> ModelList:
    models = state(request).engine.models
    return ModelList(data=[ModelCard(id=m, created=int(state(request).started), task=loaded.task, family=loaded.family,
                                     default_preset=loaded.settings.default_preset) for m, loaded in models.items()])


@router.get("/v1/accelerators", dependencies=[Depends(require_api_key)])
async def list_accelerators() -> dict:
    return {
        "object": "list",
        "methods": method_schemas(),
        "presets": {name: {"description": PRESET_DESCRIPTIONS.get(name, ""), "spec": spec}
                    for name, spec in PRESETS.items()},
        "quality_to_preset": QUALITY_TO_PRESET,
    }


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    app_state = state(request)
    if app_state.load_error:
        return JSONResponse(error_body(f"model loading failed: {app_state.load_error}", "server_error"), 503)
    if not app_state.ready or app_state.scheduler.draining:
        reason = "draining" if app_state.scheduler.draining else "loading models"
        return JSONResponse({"status": "not_ready", "reason": reason}, 503)
    return {"status": "ready", "models": list(app_state.engine.models)}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(generate_latest(state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
