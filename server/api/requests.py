"""Request normalisation: an API request becomes one `WorkItem` (its model chosen, its acceleration spec parsed
once, its parameters checked against the model once, with the model's defaults filled in) or a 400 naming the
field. What the model allows (defaults, size multiples, frame counts its VAE encodes) comes from
`accel.generate`; the limits here are the server's settings."""

from __future__ import annotations

import json
import math
import secrets
import time
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from accel.errors import AccelError, SpecError, validation_errors
from accel.generate import GenerationParams, frames_for_duration, resolve_params
from accel.presets import QUALITY_TO_PRESET
from accel.spec import AccelSpec, parse_spec

from server.api.errors import APIError, bad_request, param_of
from server.api.schemas import ImageGenerationRequest, VideoCreateRequest
from server.engine import LoadedModel
from server.scheduler import WorkItem
from server.settings import ServerSettings


def choose_model(models: dict[str, LoadedModel], model_id: str | None, task: str) -> tuple[str, LoadedModel]:
    """The named model, or the first one of the route's task; it must serve that task."""
    if not models:
        raise APIError(503, "models are still loading", type="server_error")
    model_id = model_id or next((m for m, loaded in models.items() if loaded.info.task == task), None)
    if model_id not in models:
        raise APIError(400, f"model {model_id!r} is not served here; available: {', '.join(models)}",
                       param="model", code="model_not_found")
    loaded = models[model_id]
    if loaded.info.task != task:
        other = "/v1/videos" if loaded.info.task == "text-to-video" else "/v1/images/generations"
        raise bad_request(f"model {model_id!r} is a {loaded.info.task} model; use {other}", "model")
    return model_id, loaded


def acceleration(body, loaded: LoadedModel, quality: str | None = None) -> AccelSpec:
    """The request's spec, parsed here and nowhere else: `acceleration`, else the preset `quality` maps to, else
    the model's default preset."""
    spec = body.acceleration
    if spec is None:
        spec = QUALITY_TO_PRESET.get(quality or "", loaded.settings.default_preset)
    try:
        return parse_spec(spec)
    except SpecError as exc:
        raise bad_request(str(exc), "acceleration") from None


def resolve(settings: ServerSettings, body, loaded: LoadedModel, **extra: Any) -> GenerationParams:
    """The request's generation parameters within the server's limits, resolved against the model."""
    if len(body.prompt) > settings.max_prompt_chars:
        raise bad_request(f"prompt: longer than {settings.max_prompt_chars} characters", "prompt")
    if body.negative_prompt and len(body.negative_prompt) > settings.max_prompt_chars:
        raise bad_request(f"negative_prompt: longer than {settings.max_prompt_chars} characters", "negative_prompt")
    if body.num_inference_steps is not None and body.num_inference_steps > settings.max_steps:
        raise bad_request(f"num_inference_steps: at most {settings.max_steps}", "num_inference_steps")
    width, height = body.dimensions()
    defaults = loaded.info.defaults
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
        return resolve_params(loaded.pipe, params)
    except AccelError as exc:
        raise bad_request(str(exc), param_of(exc)) from None


def _deadline(settings: ServerSettings, body) -> float:
    return time.monotonic() + (body.timeout or settings.request_timeout_s)


def image_work(settings: ServerSettings, models: dict[str, LoadedModel], body: ImageGenerationRequest) -> WorkItem:
    model_id, loaded = choose_model(models, body.model, "text-to-image")
    if body.n > settings.max_n:
        raise bad_request(f"n: at most {settings.max_n} images per request", "n")
    if body.response_format == "url":
        raise bad_request("response_format: 'url' is not supported here; use 'b64_json'", "response_format")
    quality = None if body.quality in (None, "standard", "hd") else body.quality
    spec = acceleration(body, loaded, quality)
    params = resolve(settings, body, loaded, num_outputs=body.n)
    return WorkItem(model=model_id, params=params, spec=spec, deadline=_deadline(settings, body))


def video_frames(body: VideoCreateRequest, loaded: LoadedModel, max_frames: int) -> tuple[int | None, int]:
    """(frames, fps): `num_frames`, else `seconds` at the fps rounded to a count the model's VAE encodes, else the
    model's default."""
    fps = body.fps or loaded.info.fps
    frames = body.num_frames
    if frames is None and body.seconds is not None:
        try:
            seconds = float(body.seconds)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds):
            raise bad_request("seconds: must be a number", "seconds")
        if seconds <= 0:
            raise bad_request("seconds: must be positive", "seconds")
        frames = frames_for_duration(loaded.pipe, seconds, fps)
    frames = frames or loaded.info.defaults.num_frames
    if frames and frames > max_frames:
        raise bad_request(f"num_frames: {frames} frames is more than the limit of {max_frames}", "num_frames")
    return frames, fps


def video_work(settings: ServerSettings, models: dict[str, LoadedModel],
               body: VideoCreateRequest) -> tuple[WorkItem, int]:
    """The video request's work item and its fps."""
    model_id, loaded = choose_model(models, body.model, "text-to-video")
    spec = acceleration(body, loaded)
    frames, fps = video_frames(body, loaded, settings.max_frames)
    params = resolve(settings, body, loaded, num_frames=frames)
    return WorkItem(model=model_id, params=params, spec=spec, deadline=_deadline(settings, body)), fps


async def read_video_body(request: Request) -> VideoCreateRequest:
    """The body of `POST /v1/videos`: JSON, or a form (OpenAI's client sends multipart) whose `acceleration` may
    be JSON text."""
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
        raise bad_request(*validation_errors(exc.errors())) from None
