"""Request and response schemas (OpenAI Images / Videos conventions plus our extensions).

Protocol only: no serving logic here. The video job record (`VideoJob`) is defined with the jobs it describes
(`server.jobs`) and returned as is. Field limits that depend on settings (pixels, steps, n) are checked by the
request normalisation (`server.api.requests`), which knows the settings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.jobs import VideoJob  # the job record is the response body as is

Acceleration = str | dict[str, Any] | list[str | dict[str, Any]] | None


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="a configured model id (default: the first configured model)")
    prompt: str = Field(..., min_length=1)
    negative_prompt: str | None = None
    size: str | None = Field(None, description="WxH in pixels, or 'auto' (the model's default)")
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    true_cfg_scale: float | None = Field(None, ge=1.0, le=50.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="default: random; returned in the response")
    acceleration: Acceleration = Field(None, description="preset name, method spec, or list of specs")
    timeout: float | None = Field(None, gt=0.0, le=86400.0, description="seconds before 504; default: server's")
    user: str | None = Field(None, max_length=256)

    @field_validator("size")
    @classmethod
    def _size_format(cls, size: str | None) -> str | None:
        if size is None or size == "auto":
            return size
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError("size must be 'WxH' (e.g. '512x512') or 'auto'")
        return size

    def dimensions(self) -> tuple[int | None, int | None]:
        """(width, height) or (None, None) for the model's default."""
        if self.size in (None, "auto"):
            return None, None
        width, height = (int(p) for p in self.size.lower().split("x"))
        return width, height


class ImageGenerationRequest(_Request):
    n: int = Field(1, ge=1)
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = Field(
        None, description="maps to a preset: high=quality, medium/auto=balanced, low=fast (overridden by acceleration)"
    )
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    style: str | None = None
    background: str | None = None
    moderation: str | None = None


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
    timings: dict[str, float]


class VideoCreateRequest(_Request):
    seconds: str | int | float | None = Field(None, description="clip length; frames = seconds x fps (4k+1)")
    num_frames: int | None = Field(None, ge=1)
    fps: int | None = Field(None, ge=1, le=120)
    input_reference: Any = None

    @field_validator("input_reference")
    @classmethod
    def _no_reference(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("image-to-video input references are not supported")
        return value


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
    task: str
    family: str
    default_preset: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
