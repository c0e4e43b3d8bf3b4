"""Request and response schemas (OpenAI Images / Videos conventions plus our extensions).

Protocol only: no serving logic here. The video job record (`VideoJob`) is defined with the jobs it describes
(`server.jobs`) and returned as is. Field limits that depend on settings (pixels, steps, n) are checked by the
request normalisation (`server.api.requests`), which knows the settings. Requests are strict: a number is a JSON
number (not "2", not true), and a form's text is converted only for multipart bodies, whose fields are text.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from accel.lora import LORA_NAME_PATTERN, LORA_SCALE_RANGE, MAX_LORAS_PER_REQUEST

from server.api.uploads import Upload
from server.jobs import VideoJob  # the job record is the response body as is

MAX_SECONDS = 3600.0


_SPEC_TEXT = {"type": "string", "maxLength": 1000, "description": "preset name, `method:key=value,...`, or JSON text"}
_METHOD_SPEC = {"type": "object", "required": ["method"], "additionalProperties": True,
                "properties": {"method": {"type": "string", "minLength": 1, "maxLength": 64}},
                "description": 'one method and its knobs, e.g. {"method": "sortblock", "K": 4}'}


def _spec_shape(value: Any) -> Any:
    """The shapes `accel.spec.parse_spec` takes from a request; what each knob may be is checked there."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if len(items) > 16:
        raise ValueError("at most 16 specs")
    for item in items:
        if not (isinstance(item, str) and len(item) <= 1000
                or isinstance(item, dict) and isinstance(item.get("method"), str)
                or isinstance(item, dict) and isinstance(item.get("target"), dict)):
            raise ValueError("a preset name or spec text (at most 1000 characters), an object with a string "
                             "`method`, a fidelity target {\"target\": {\"psnr\": 35}}, or a list of these")
    return value


_TARGET = {"type": "object", "required": ["target"], "additionalProperties": False,
           "properties": {"target": {"type": "object", "additionalProperties": False, "properties": {
               "psnr": {"type": "number", "minimum": 15, "maximum": 80},
               "speedup": {"type": "number", "minimum": 1, "maximum": 100},
               "guard": {"type": "boolean"}}}},
           "description": "a fidelity target, resolved on the model's calibrated profile: exactly one of psnr (dB at "
                          "the 10th-percentile prompt) or speedup"}

Acceleration = Annotated[
    Any, AfterValidator(_spec_shape),
    WithJsonSchema({"anyOf": [_SPEC_TEXT, _METHOD_SPEC, _TARGET,
                              {"type": "array", "maxItems": 16, "items": {"anyOf": [_SPEC_TEXT, _METHOD_SPEC]}},
                              {"type": "null"}]}),
]


def _seconds_text(value: Any) -> Any:
    """OpenAI sends `seconds` as text ("4"); only plain ASCII decimals are numbers here."""
    if isinstance(value, str):
        if not re.fullmatch(r"[0-9]{1,4}(\.[0-9]{1,3})?", value):
            raise ValueError("must be a number of seconds, e.g. 4 or '4'")
        return float(value)
    return value


Seconds = Annotated[
    float, Field(gt=0.0, le=MAX_SECONDS), BeforeValidator(_seconds_text),
    WithJsonSchema({"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS},
                              {"type": "string", "pattern": r"^[0-9]{1,4}(\.[0-9]{1,3})?$"}]}),
]


_BINARY = {"type": "string", "format": "binary"}
_NOT_A_FILE = "must be an image file: a file part (with a filename) of a multipart/form-data body; no URL or path is read"


def _upload(value: Any) -> Any:
    if value is not None and not isinstance(value, Upload):
        raise ValueError(_NOT_A_FILE)
    return value


def _uploads(value: list[Any]) -> list[Upload]:
    if not value:
        raise ValueError("at least one image is required")
    if not all(isinstance(item, Upload) for item in value):
        raise ValueError(_NOT_A_FILE)
    return value


ImageFile = Annotated[Any, AfterValidator(_upload), WithJsonSchema(_BINARY)]
ImageFiles = Annotated[list[Any], AfterValidator(_uploads),
                       WithJsonSchema({"type": "array", "items": _BINARY, "minItems": 1})]


class LoraRequest(BaseModel):
    """One LoRA adapter for a request: its name (`GET /v1/models` lists each model's `loras`) and scale."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(..., min_length=1, max_length=64, json_schema_extra={"pattern": LORA_NAME_PATTERN},
                      description="an adapter of the model (its card's `loras`); never a path")
    scale: float = Field(1.0, json_schema_extra={"minimum": LORA_SCALE_RANGE[0], "maximum": LORA_SCALE_RANGE[1]},
                         description=f"strength in [{LORA_SCALE_RANGE[0]:g}, {LORA_SCALE_RANGE[1]:g}]: 1 as "
                         "trained, 0 off (outside the range: 400 naming `lora[i].scale`)")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, min_length=1, max_length=100,
                              description="a configured model id (default: the first model of the route's task)")
    prompt: str = Field(..., min_length=1)
    negative_prompt: str | None = None
    size: str | None = Field(None, pattern=r"^(auto|[1-9][0-9]{0,4}[xX][1-9][0-9]{0,4})$",
                             description="WxH in pixels, or 'auto' (the model's default)")
    num_inference_steps: int | None = Field(None, ge=1, le=10000)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    true_cfg_scale: float | None = Field(None, ge=1.0, le=50.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="default: random; returned in the response")
    acceleration: Acceleration = Field(None, description="preset name, method spec, or list of specs (knobs per "
                                       "method: GET /v1/accelerators)")
    lora: list[LoraRequest] | None = Field(
        None, max_length=MAX_LORAS_PER_REQUEST, description="LoRA adapters to apply, each with its scale; requests "
        "with the same set and scales are batched together; none or []: the base model, bit for bit")
    timeout: float | None = Field(None, gt=0.0, le=86400.0, description="seconds before 504; default and maximum: the server's request_timeout_s")
    user: str | None = Field(None, max_length=256)

    def dimensions(self) -> tuple[int | None, int | None]:
        """(width, height) or (None, None) for the model's default."""
        if self.size in (None, "auto"):
            return None, None
        width, height = (int(p) for p in self.size.lower().split("x"))
        return width, height


class ImageGenerationRequest(_Request):
    n: int = Field(1, ge=1, le=16)
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = Field(
        None, description="a model with a calibrated profile: a fidelity target (high: 40 dB, medium/auto: 35 dB, "
        "low: 30 dB PSNR at the 10th-percentile prompt); else a preset: high=quality, medium/auto=balanced, "
        "low=fast (overridden by acceleration)"
    )
    response_format: Literal["b64_json"] = Field("b64_json", description="images come inline as base64")
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    style: str | None = Field(None, max_length=64)
    background: str | None = Field(None, max_length=64)
    moderation: str | None = Field(None, max_length=64)


class ImageEditRequest(ImageGenerationRequest):
    """multipart/form-data only: the generation fields as text (`acceleration` may be JSON text) plus the files."""

    image: ImageFiles = Field(..., description="the image to edit, then any reference images (PNG, JPEG or WebP); "
                              "repeat the part for several (`image` or `image[]`), as many as the model takes")
    mask: ImageFile = Field(None, description="where the image may change (models that take a mask only)")


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    quality: str | None = None
    seed: int
    model: str
    acceleration: dict[str, Any]
    lora: list[dict[str, Any]] = Field(default_factory=list, description="the LoRA adapters that ran (name, scale)")
    timings: dict[str, float]


class VideoCreateRequest(_Request):
    seconds: Seconds | None = Field(None, description="clip length; frames = seconds x fps, rounded to what the "
                                    "model's VAE encodes")
    num_frames: int | None = Field(None, ge=1, le=10000)
    fps: int | None = Field(None, ge=1, le=120)
    input_reference: ImageFile = Field(None, description="image-to-video models: the first frame (PNG, JPEG or "
                                       "WebP), a file part of a multipart/form-data body")


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoJob]


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "diffusion-accel"
    task: str = Field(description="the model's main task (the first of `tasks`)")
    tasks: list[str] = Field(description="text-to-image, image-edit (/v1/images/edits), text-to-video, "
                             "image-to-video (/v1/videos with input_reference)")
    family: str
    max_input_images: int = Field(0, description="input images a request may give (edits, image-to-video)")
    default_preset: str
    prune_plans: list[str] = Field(default_factory=list, description="plan names `prune:plan=<name>` may use")
    loras: list[str] = Field(default_factory=list, description="LoRA adapters a request may name in `lora`")
    default_size: str | None = Field(None, description="WxH a request without `size` gets")
    default_steps: int | None = Field(None, description="num_inference_steps a request without it gets")
    default_guidance: float | None = None
    default_frames: int | None = Field(None, description="videos: frames a request without seconds/num_frames gets")
    size_multiple: int = Field(1, description="width and height must be multiples of this")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    models: list[str]


class NotReady(BaseModel):
    status: Literal["not_ready"] = "not_ready"
    reason: str
    progress: dict[str, Any] | None = Field(None, description="while calibrating: model, runs done, runs in all")
