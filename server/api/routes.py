"""Routes: normalise a request completely (`server.api.requests`: 4xx naming the field) before it is admitted, hand
it to the scheduler (images) or the video-job service (videos), and map outcomes to status codes."""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
from contextlib import contextmanager
from typing import Iterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from accel.io import image_bytes
from accel.presets import PRESET_DESCRIPTIONS, PRESETS, QUALITY_TO_PRESET
from accel.spec import method_schemas

from server.api.errors import APIError, bad_request, error_body, failure
from server.api.requests import image_work, read_video_body, video_work
from server.api.schemas import (
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    VideoDeleted,
    VideoJob,
    VideoList,
)
from server.scheduler import Cancelled, Draining, QueueFull

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
@router.post("/v1/images/generations", dependencies=[Depends(require_api_key)])
async def create_images(request: Request, body: ImageGenerationRequest):
    app_state = state(request)
    item = image_work(app_state.settings, app_state.engine.models, body)
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
                          acceleration=result.report, timings=timings)


# -- videos ------------------------------------------------------------------------------------------------------
@router.post("/v1/videos", dependencies=[Depends(require_api_key)])
async def create_video(request: Request) -> VideoJob:
    app_state = state(request)
    item, fps = video_work(app_state.settings, app_state.engine.models, await read_video_body(request))
    with admission(app_state):
        job = await app_state.videos.submit(item, fps)
    request.state.log.update(model=item.model, spec=item.spec.key, seed=item.params.seed, job=job.id)
    return job


async def _job(app_state, video_id: str) -> VideoJob:
    job = await app_state.videos.get(video_id)
    if job is None:
        raise APIError(404, f"no video job {video_id!r}", type="not_found_error", param="video_id")
    return job


@router.get("/v1/videos", dependencies=[Depends(require_api_key)])
async def list_videos(request: Request) -> VideoList:
    return VideoList(data=await state(request).videos.list())


@router.get("/v1/videos/{video_id}", dependencies=[Depends(require_api_key)])
async def get_video(request: Request, video_id: str) -> VideoJob:
    return await _job(state(request), video_id)


@router.get("/v1/videos/{video_id}/content", dependencies=[Depends(require_api_key)])
async def get_video_content(request: Request, video_id: str, variant: str = "video"):
    app_state = state(request)
    job = await _job(app_state, video_id)
    if variant != "video":
        raise bad_request(f"variant: only 'video' is available, not {variant!r}", "variant")
    content = await app_state.videos.content(video_id)
    if job.status != "completed" or content is None:
        raise APIError(409, f"video {video_id} is not ready (status {job.status})", code="not_ready")
    return Response(content, media_type="video/mp4")


@router.delete("/v1/videos/{video_id}", dependencies=[Depends(require_api_key)])
async def delete_video(request: Request, video_id: str) -> VideoDeleted:
    """Deletes the job and stops its work, wherever it runs (see `VideoJobs.delete`)."""
    app_state = state(request)
    await _job(app_state, video_id)
    await app_state.videos.delete(video_id)
    return VideoDeleted(id=video_id)


# -- listings and health -----------------------------------------------------------------------------------------
@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def list_models(request: Request) -> ModelList:
    app_state = state(request)
    return ModelList(data=[ModelCard(id=m, created=int(app_state.started), task=loaded.info.task,
                                     family=loaded.info.family, default_preset=loaded.settings.default_preset)
                           for m, loaded in app_state.engine.models.items()])


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
