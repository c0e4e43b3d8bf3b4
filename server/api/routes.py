"""Routes: normalise a request completely (`server.api.requests`: 4xx naming the field) before it is admitted, hand
it to the scheduler (images) or the video-job service (videos), and map outcomes to status codes."""

from __future__ import annotations

import asyncio
import base64
import time
from contextlib import contextmanager
from typing import Iterator

from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from accel.errors import SpecError
from accel.io import image_bytes
from accel.presets import PRESET_DESCRIPTIONS, PRESETS, QUALITY_TO_PRESET
from accel.calibration.target import QUALITY_TO_TARGET
from accel.spec import method_schemas, parse_spec

from server.api.errors import APIError, bad_request, error_body, failure
from server.api.guard import authorised
from server.api.requests import image_work, input_images, read_body, video_work
from server.api.schemas import (
    ErrorResponse,
    Health,
    ImageData,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    NotReady,
    Ready,
    VideoCreateRequest,
    VideoDeleted,
    VideoJob,
    VideoList,
)
from server.scheduler import Cancelled, Draining, QueueFull

router = APIRouter()
# documents the bearer scheme in OpenAPI; keys are checked before the body is read (`server.api.guard`)
bearer = HTTPBearer(auto_error=False, description="one of the server's `api_keys` (only when any are set)")

_ERRORS = {
    400: "invalid request: `error.param` names the field",
    401: "missing or invalid API key",
    404: "no such video job",
    408: "the request body did not arrive within `body_timeout_s`",
    409: "the video is not ready",
    413: "request body larger than `max_body_bytes`",
    415: "the body is not JSON (videos: or multipart/form-data; edits: multipart/form-data only)",
    429: "the queue is full; retry after `Retry-After` seconds",
    503: "models still loading, the server draining, or out of device memory",
    504: "the request did not finish before its deadline",
}


def errors(*codes: int) -> dict:
    """OpenAPI responses for these error statuses (every route may also answer 401); always JSON, whatever the
    route's own media type."""
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {code: {"description": _ERRORS[code], "content": content} for code in sorted({401, *codes})}


def request_body(schema: type, *, json: bool = True, multipart: bool = False) -> dict:
    """OpenAPI request body for a route that reads its body itself (`read_body`)."""
    ref = {"$ref": f"#/components/schemas/{schema.__name__}"}
    content = {}
    if json:
        content["application/json"] = {"schema": ref}
    if multipart:
        content["multipart/form-data"] = {"schema": ref}
    return {"requestBody": {"required": True, "content": content}}


def state(request: Request):
    return request.app.state.accel


async def require_api_key(request: Request) -> None:
    """A second check behind the guard's (`server.api.guard`, which answers before the body is read): it keeps a
    route protected if it is ever served without the guard."""
    if not authorised(state(request).settings, request.url.path, request.headers.get("authorization", "")):
        raise APIError(401, "missing or invalid API key (Authorization: Bearer ...)", type="authentication_error",
                       headers={"WWW-Authenticate": "Bearer"})


PROTECTED = [Security(bearer), Depends(require_api_key)]


@contextmanager
def admission(app_state) -> Iterator[None]:
    """Refusals at admission: a full queue is 429 with Retry-After at once; a draining server 503."""
    try:
        yield
    except QueueFull:
        raise APIError(429, "the queue is full; retry later", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(app_state.retry_after())}) from None
    except Draining:
        raise APIError(503, "the server is shutting down", type="server_error", headers={"Retry-After": "5"}) from None


# -- images ------------------------------------------------------------------------------------------------------
@router.post("/v1/images/generations", dependencies=PROTECTED, operation_id="create_images",
             responses=errors(400, 408, 413, 415, 429, 503, 504), openapi_extra=request_body(ImageGenerationRequest))
async def create_images(request: Request) -> ImagesResponse:
    app_state = state(request)
    body = await read_body(request, ImageGenerationRequest)
    return await _images(request, body, image_work(app_state.settings, app_state.engine.models, body))


@router.post("/v1/images/edits", dependencies=PROTECTED, operation_id="edit_images",
             responses=errors(400, 408, 413, 415, 429, 503, 504),
             openapi_extra=request_body(ImageEditRequest, json=False, multipart=True))
async def edit_images(request: Request) -> ImagesResponse:
    """Edit images with an image-edit model (FLUX.1 Kontext, Qwen-Image-Edit, FLUX.2 with reference images):
    multipart/form-data with `image` (one or more files) and `prompt`, plus the generation fields."""
    app_state = state(request)
    body = await read_body(request, ImageEditRequest, accept_json=False, multipart=True)
    inputs = await input_images(app_state.settings, body)
    return await _images(request, body, image_work(app_state.settings, app_state.engine.models, body, **inputs))


async def _images(request: Request, body: ImageGenerationRequest, item) -> ImagesResponse:
    """Submit an image request's work, wait for it (cancelled when the client goes away) and answer."""
    app_state = state(request)
    request.state.log.update(model=item.model, spec=item.spec.key, seed=item.params.seed, item=item.id)
    with admission(app_state):
        future = app_state.scheduler.submit(item)
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
        raise failure(exc, item.id)
    result = future.result()
    fmt = body.output_format
    data = [ImageData(b64_json=base64.b64encode(image_bytes(img, fmt, body.output_compression)).decode())
            for img in result.images]
    timings = {"queue_ms": round((item.started - item.enqueued) * 1000, 2),
               "run_ms": round((item.finished - item.started) * 1000, 2), "batch_size": item.record.size}
    request.state.log.update(timings=timings)
    h, w = result.images.shape[1:3]
    return ImagesResponse(created=int(time.time()), data=data, output_format=fmt, size=f"{w}x{h}",
                          quality=body.quality, seed=item.params.seed, model=item.model,
                          acceleration=result.report, lora=result.report.get("lora", []), timings=timings)


# -- videos ------------------------------------------------------------------------------------------------------
_VIDEO_LINKS = {
    name: {"operationId": operation, "parameters": {"video_id": "$response.body#/id"}}
    for name, operation in (("GetVideo", "get_video"), ("GetVideoContent", "get_video_content"),
                            ("DeleteVideo", "delete_video"))
}


@router.post("/v1/videos", dependencies=PROTECTED, operation_id="create_video",
             responses={**errors(400, 408, 413, 415, 429, 503), 200: {"links": _VIDEO_LINKS}},
             openapi_extra=request_body(VideoCreateRequest, multipart=True))
async def create_video(request: Request) -> VideoJob:
    app_state = state(request)
    body = await read_body(request, VideoCreateRequest, multipart=True)
    inputs = await input_images(app_state.settings, body)
    item, fps = video_work(app_state.settings, app_state.engine.models, body, **inputs)
    reference = body.input_reference.content if body.input_reference is not None else None
    with admission(app_state):
        job = await app_state.videos.submit(item, fps, input_reference=reference)
    request.state.log.update(model=item.model, spec=item.spec.key, seed=item.params.seed, job=job.id)
    return job


async def _job(app_state, video_id: str) -> VideoJob:
    job = await app_state.videos.get(video_id)
    if job is None:
        raise APIError(404, f"no video job {video_id!r}", type="not_found_error", param="video_id")
    return job


@router.get("/v1/videos", dependencies=PROTECTED, operation_id="list_videos", responses=errors())
async def list_videos(request: Request) -> VideoList:
    return VideoList(data=await state(request).videos.list())


@router.get("/v1/videos/{video_id}", dependencies=PROTECTED, operation_id="get_video", responses=errors(400, 404))
async def get_video(request: Request, video_id: str) -> VideoJob:
    return await _job(state(request), video_id)


class MP4Response(Response):
    media_type = "video/mp4"


@router.get("/v1/videos/{video_id}/content", dependencies=PROTECTED, operation_id="get_video_content",
            response_class=MP4Response, responses={
                **errors(400, 404, 409), 200: {"content": {"video/mp4": {"schema": {"type": "string",
                                                                                     "format": "binary"}}}}})
async def get_video_content(request: Request, video_id: str, variant: str = "video"):
    app_state = state(request)
    job = await _job(app_state, video_id)
    if variant != "video":
        raise bad_request(f"variant: only 'video' is available, not {variant!r}", "variant")
    content = await app_state.videos.content(video_id)
    if job.status != "completed" or content is None:
        raise APIError(409, f"video {video_id} is not ready (status {job.status})", code="not_ready")
    return MP4Response(content)


@router.delete("/v1/videos/{video_id}", dependencies=PROTECTED, operation_id="delete_video",
               responses=errors(400, 404))
async def delete_video(request: Request, video_id: str) -> VideoDeleted:
    """Deletes the job and stops its work, wherever it runs (see `VideoJobs.delete`)."""
    app_state = state(request)
    await _job(app_state, video_id)
    await app_state.videos.delete(video_id)
    return VideoDeleted(id=video_id)


# -- listings and health -----------------------------------------------------------------------------------------
@router.get("/v1/models", dependencies=PROTECTED, operation_id="list_models", responses=errors())
async def list_models(request: Request) -> ModelList:
    app_state = state(request)
    return ModelList(data=[_card(m, loaded, int(app_state.started)) for m, loaded in app_state.engine.models.items()])


def _card(model_id: str, loaded, created: int) -> ModelCard:
    info, defaults = loaded.info, loaded.info.defaults
    size = f"{defaults.width}x{defaults.height}" if defaults.width and defaults.height else None
    return ModelCard(id=model_id, created=created, task=info.task, tasks=list(info.tasks), family=info.family,
                     max_input_images=info.max_images, default_preset=loaded.settings.default_preset, prune_plans=list(info.prune_plans), loras=list(info.loras),
                     default_size=size, default_steps=defaults.num_inference_steps,
                     default_guidance=defaults.guidance_scale, default_frames=defaults.num_frames,
                     size_multiple=info.size_multiple)


def _allowed(settings, spec) -> bool:
    try:
        settings.check_spec(parse_spec(spec))
    except SpecError:
        return False
    return True


@router.get("/v1/accelerators", dependencies=PROTECTED, operation_id="list_accelerators", responses=errors())
async def list_accelerators(request: Request) -> dict:
    """The methods, presets and quality levels this server allows, with each method's knobs and their limits."""
    settings = state(request).settings
    allowed = settings.allowed_methods
    methods = {name: {**info, "limits": settings.method_limits.get(name, {})}
               for name, info in method_schemas().items() if allowed is None or name in allowed}
    presets = {name: {"description": PRESET_DESCRIPTIONS.get(name, ""), "spec": spec}
               for name, spec in PRESETS.items() if _allowed(settings, spec)}
    return {
        "object": "list",
        "methods": methods,
        "presets": presets,
        "quality_to_preset": {quality: preset for quality, preset in QUALITY_TO_PRESET.items() if preset in presets},
        "quality_to_target": QUALITY_TO_TARGET,  # instead of the presets, for models with a calibrated profile
    }


@router.get("/health", operation_id="health")
async def health() -> Health:
    return Health()


@router.get("/ready", operation_id="ready",
            responses={503: {"model": NotReady | ErrorResponse, "description": "loading, draining or failed"}})
async def ready(request: Request) -> Ready:
    app_state = state(request)
    if app_state.load_error:
        return JSONResponse(error_body(f"model loading failed: {app_state.load_error}", "server_error"), 503)
    if not app_state.ready or app_state.scheduler.draining:
        calibrating = app_state.engine.calibrating
        reason = "draining" if app_state.scheduler.draining else "calibrating" if calibrating else "loading models"
        return JSONResponse(NotReady(reason=reason, progress=calibrating).model_dump(), 503)
    return Ready(models=list(app_state.engine.models))


@router.get("/metrics", operation_id="metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text format"}})
async def metrics(request: Request):
    return Response(generate_latest(state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
