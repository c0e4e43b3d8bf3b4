"""Request normalisation: an API request becomes one `WorkItem` (its model chosen, its acceleration spec parsed
once, its parameters checked against the model once, with the model's defaults filled in) or a 4xx naming the
field. What the model allows (defaults, size multiples, frame counts its VAE encodes, the prune plans it has) comes
from `accel.generate`; the limits here are the server's settings, applied to what will run (defaults included).

Bodies are read here, not by FastAPI, so that every framing meets the same rules: JSON is UTF-8 without a BOM,
with no NaN or Infinity, nested at most `MAX_DEPTH` deep; a multipart form's fields are UTF-8 text, and its files
(input images) are decoded in memory within the server's count and pixel limits (`server.api.uploads`)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from accel.apply import check_supported
from accel.errors import AccelError, SpecError, validation_errors
from accel.generate import (
    GenerationParams,
    ResolvedParams,
    frames_for_duration,
    resolve_params,
    resolve_request_target,
)
from accel.calibration.profile import NoProfileError, profile_of
from accel.calibration.target import QUALITY_TO_TARGET
from accel.presets import QUALITY_TO_PRESET
from accel.spec import AccelSpec, parse_spec

from server.api.errors import APIError, bad_request, param_of
from server.api.schemas import ImageEditRequest, ImageGenerationRequest, VideoCreateRequest
from server.api.uploads import Upload, decode_image, parse_form
from server.engine import LoadedModel
from server.scheduler import WorkItem
from server.settings import ServerSettings

MAX_DEPTH = 16  # JSON nesting a request may use; the deepest valid request (a spec list of objects) needs 4

Body = TypeVar("Body", bound=BaseModel)


ROUTES = {"text-to-image": "/v1/images/generations", "image-edit": "/v1/images/edits",
          "text-to-video": "/v1/videos", "image-to-video": "/v1/videos (with input_reference)"}


def choose_model(models: dict[str, LoadedModel], model_id: str | None,
                 tasks: tuple[str, ...]) -> tuple[str, LoadedModel]:
    """The named model, or the first one serving the route's first task (else its next); the model must serve one
    of the route's tasks. Whether the request's inputs fit the model's task is `resolve_params`'s to say."""
    if not models:
        raise APIError(503, "models are still loading", type="server_error")
    available = ", ".join(models)
    if model_id is None:
        model_id = next((m for task in tasks for m, loaded in models.items() if task in loaded.info.tasks), None)
        if model_id is None:
            raise APIError(400, f"no {tasks[0]} model is served here; available: {available}", param="model",
                           code="model_not_found")
    if model_id not in models:
        raise APIError(400, f"model {model_id!r} is not served here; available: {available}",
                       param="model", code="model_not_found")
    loaded = models[model_id]
    if not set(tasks) & set(loaded.info.tasks):
        served = ", ".join(loaded.info.tasks)
        routes = " or ".join(dict.fromkeys(ROUTES[task] for task in loaded.info.tasks))
        raise bad_request(f"model {model_id!r} serves {served}; use {routes}", "model")
    return model_id, loaded


def acceleration(settings: ServerSettings, body, loaded: LoadedModel, quality: str | None = None) -> AccelSpec:
    """The request's spec, parsed here and nowhere else: `acceleration`, else the preset `quality` maps to, else
    the model's default preset. A prune plan is one of the model's configured names (never a path), and the
    methods and knobs are within what the settings allow."""
    spec = body.acceleration
    if spec is None and quality in QUALITY_TO_TARGET and profile_of(loaded.pipe) is not None:
        spec = {"target": QUALITY_TO_TARGET[quality]}  # a calibrated model: quality levels are fidelity targets
    if spec is None:
        spec = QUALITY_TO_PRESET.get(quality or "", loaded.settings.default_preset)
    try:
        parsed = parse_spec(spec, plans=loaded.info.prune_plans)
        settings.check_spec(parsed)
        check_supported(loaded.pipe, parsed)  # a video job is refused here, not accepted and failed
    except SpecError as exc:
        raise bad_request(str(exc), "acceleration") from None
    except RecursionError:  # a shorthand value nested deeper than Python parses
        raise bad_request("acceleration: nested too deeply", "acceleration") from None
    return parsed


def with_target(settings: ServerSettings, spec: AccelSpec, loaded: LoadedModel, params: ResolvedParams) -> AccelSpec:
    """A fidelity target resolved on the model's profile at the request's size and steps, among the settings this
    server allows (the resolved spec replaces the target); a model without a profile is a 400 naming how to
    calibrate it."""
    if spec.target is None:
        return spec

    def allowed(candidate: AccelSpec) -> bool:
        try:
            settings.check_spec(candidate)
        except SpecError:
            return False
        return True

    try:
        return resolve_request_target(loaded.pipe, spec, params, allowed=allowed)
    except NoProfileError as exc:
        raise APIError(400, str(exc), param="acceleration", code="model_not_calibrated") from None


def _over_limits(settings: ServerSettings, params: ResolvedParams) -> None:
    """The server's limits on what will run, the model's defaults included."""
    if params.num_inference_steps and params.num_inference_steps > settings.max_steps:
        raise bad_request(f"num_inference_steps: {params.num_inference_steps} is more than this server's limit of "
                          f"{settings.max_steps} (the model's default applies when none is given)",
                          "num_inference_steps")
    if params.width and params.height and params.width * params.height > settings.max_pixels:
        raise bad_request(f"size: {params.width}x{params.height} is more than {settings.max_pixels} pixels", "size")
    if params.num_frames and params.num_frames > settings.max_frames:
        raise bad_request(f"num_frames: {params.num_frames} frames is more than the limit of {settings.max_frames}",
                          "num_frames")


def resolve(settings: ServerSettings, body, loaded: LoadedModel, image_param: str = "image",
            **extra: Any) -> ResolvedParams:
    """The request's generation parameters resolved against the model, within the server's limits; `image_param`
    is the request's name for the input images."""
    if len(body.prompt) > settings.max_prompt_chars:
        raise bad_request(f"prompt: longer than {settings.max_prompt_chars} characters", "prompt")
    if body.negative_prompt and len(body.negative_prompt) > settings.max_prompt_chars:
        raise bad_request(f"negative_prompt: longer than {settings.max_prompt_chars} characters", "negative_prompt")
    width, height = body.dimensions()
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    try:
        params = GenerationParams.parse(
            prompt=body.prompt, negative_prompt=body.negative_prompt, num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, true_cfg_scale=body.true_cfg_scale, height=height, width=width,
            seed=seed, lora=[ref.model_dump() for ref in body.lora] if body.lora else None, **extra,
        )
        params = resolve_params(loaded.pipe, params)
    except AccelError as exc:
        param = param_of(exc)
        if param == "image" and image_param != "image":
            raise bad_request(image_param + str(exc).removeprefix("image"), image_param) from None
        raise bad_request(str(exc), param) from None
    _over_limits(settings, params)
    return params


def _deadline(settings: ServerSettings, body) -> float:
    """A request may ask for less time than the server's `request_timeout_s`, never more."""
    return time.monotonic() + min(body.timeout or settings.request_timeout_s, settings.request_timeout_s)


def image_work(settings: ServerSettings, models: dict[str, LoadedModel], body: ImageGenerationRequest,
               **inputs: Any) -> WorkItem:
    """A generation, or with `inputs` (decoded `images` and `mask`: `input_images`) an edit."""
    task = "image-edit" if isinstance(body, ImageEditRequest) else "text-to-image"
    model_id, loaded = choose_model(models, body.model, (task,))
    if body.n > settings.max_n:
        raise bad_request(f"n: at most {settings.max_n} images per request", "n")
    quality = None if body.quality in (None, "standard", "hd") else body.quality
    spec = acceleration(settings, body, loaded, quality)
    params = resolve(settings, body, loaded, num_outputs=body.n, **inputs)
    spec = with_target(settings, spec, loaded, params)
    return WorkItem(model=model_id, params=params, spec=spec, deadline=_deadline(settings, body))


async def input_images(settings: ServerSettings, body) -> dict[str, Any]:
    """The request's input images decoded (off the event loop): `images` from `image` (an edit) or
    `input_reference` (image-to-video), and `mask`; at most `max_input_images`, each within `max_input_pixels`."""
    uploads: list[tuple[Upload, str]] = []
    if isinstance(body, ImageEditRequest):
        if len(body.image) > settings.max_input_images:
            raise bad_request(f"image: {len(body.image)} images is more than this server's limit of "
                              f"{settings.max_input_images}", "image")
        single = len(body.image) == 1
        uploads = [(upload, "image" if single else f"image[{i}]") for i, upload in enumerate(body.image)]
    elif getattr(body, "input_reference", None) is not None:
        uploads = [(body.input_reference, "input_reference")]
    mask = getattr(body, "mask", None)

    def decode() -> dict[str, Any]:
        inputs: dict[str, Any] = {}
        if uploads:
            inputs["images"] = [decode_image(upload, param, settings.max_input_pixels) for upload, param in uploads]
        if mask is not None:
            inputs["mask"] = decode_image(mask, "mask", settings.max_input_pixels, mode="L")
        return inputs

    return await asyncio.to_thread(decode) if uploads or mask is not None else {}


def video_frames(body: VideoCreateRequest, loaded: LoadedModel, max_frames: int) -> tuple[int | None, int]:
    """(frames, fps): `num_frames`, else `seconds` at the fps rounded to a count the model's VAE encodes (at most
    `max_frames`), else the model's default."""
    fps = body.fps or loaded.info.fps
    frames = body.num_frames
    if frames is None and body.seconds is not None:
        if body.seconds * fps > max_frames:
            raise bad_request(f"seconds: {body.seconds:g} s at {fps} fps is more than the limit of {max_frames} "
                              "frames", "seconds")
        frames = frames_for_duration(loaded.pipe, body.seconds, fps)
    return frames, fps


def video_work(settings: ServerSettings, models: dict[str, LoadedModel], body: VideoCreateRequest,
               **inputs: Any) -> tuple[WorkItem, int]:
    """The video request's work item and its fps; with `inputs` (the decoded `input_reference` as `images`:
    `input_images`) image-to-video."""
    tasks = ("image-to-video", "text-to-video") if inputs else ("text-to-video", "image-to-video")
    model_id, loaded = choose_model(models, body.model, tasks)
    spec = acceleration(settings, body, loaded)
    frames, fps = video_frames(body, loaded, settings.max_frames)
    params = resolve(settings, body, loaded, image_param="input_reference", num_frames=frames, **inputs)
    spec = with_target(settings, spec, loaded, params)
    return WorkItem(model=model_id, params=params, spec=spec, deadline=_deadline(settings, body)), fps


# -- bodies ------------------------------------------------------------------------------------------------------
def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise bad_request("the body must be UTF-8 JSON") from None
    except RecursionError:
        raise bad_request(f"the body is nested more than {MAX_DEPTH} deep") from None
    except ValueError as exc:  # JSONDecodeError (a BOM too), NaN, Infinity
        raise bad_request(f"malformed JSON body: {exc}") from None


def _form(content_type: str, raw: bytes) -> dict[str, Any]:
    """A multipart form's fields (`server.api.uploads.parse_form`); `acceleration` may be JSON text, `lora` is."""
    fields = parse_form(content_type, raw)
    text = fields.get("acceleration")
    if isinstance(text, str) and text[:1] in ("[", "{"):
        fields["acceleration"] = _json(text.encode())
    if isinstance(fields.get("lora"), str):
        fields["lora"] = _json(fields["lora"].encode())
    return fields


def _depth(value: Any, limit: int) -> int:
    """How deep `value` nests, counting no further than `limit + 1`."""
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(item, limit - 1) for item in items), default=0)


async def read_body(request: Request, schema: type[Body], *, accept_json: bool = True,
                    multipart: bool = False) -> Body:
    """The body as `schema`: JSON (strict types) unless `accept_json` is False, and with `multipart`
    multipart/form-data (its text fields converted to the schema's types, its files as `Upload`s). Any other
    content type is 415."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if accept_json and media == "application/json":
        data, strict = _json(await request.body()), True
    elif multipart and media == "multipart/form-data":
        data, strict = _form(content_type, await request.body()), False
    else:  # refused before a byte of the body is read
        kinds = (("application/json", accept_json), ("multipart/form-data", multipart))
        accepted = " or ".join(name for name, on in kinds if on)
        raise APIError(415, f"content type {media or 'none'!r} is not accepted here; send {accepted}",
                       code="unsupported_media_type")
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    if _depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise bad_request(f"the body is nested more than {MAX_DEPTH} deep")
    try:
        return schema.model_validate(data, strict=strict)
    except ValidationError as exc:
        errors = exc.errors()
        raise bad_request(validation_errors(errors)[0], str(errors[0]["loc"][0]) if errors[0]["loc"] else None) from None
