"""Run a pipeline from validated, family-independent generation parameters.

The CLI, the benchmark and the server all generate through `generate()`, so the same request and seed give the
same output everywhere. Parameters a model does not take (frames for an image model, `true_cfg_scale` outside
FLUX) and sizes that are not a multiple of the model's factor are errors that name the field, not warnings.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from accel.adapters import adapter_for
from accel.apply import accelerate
from accel.errors import GenerationParamsError


class GenerationParams(BaseModel):
    """One generation request. `None` means: the model's default."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., max_length=4000)
    negative_prompt: str | None = Field(None, max_length=4000)
    num_inference_steps: int | None = Field(None, ge=1, le=500)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    true_cfg_scale: float | None = Field(None, ge=1.0, le=50.0, description="FLUX only: real CFG with a negative prompt.")
    height: int | None = Field(None, ge=16, le=4096)
    width: int | None = Field(None, ge=16, le=4096)
    num_frames: int | None = Field(None, ge=1, le=1025, description="Video models only.")
    num_outputs: int = Field(1, ge=1, le=16, description="Images (or videos) per prompt.")
    seed: int = Field(0, ge=0, le=2**63 - 1)

    @classmethod
    def parse(cls, **values: Any) -> "GenerationParams":
        """Validate, turning pydantic's errors into one `GenerationParamsError` that names each field."""
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise GenerationParamsError(msg) from None


@dataclass
class GenerationResult:
    """Images as float arrays (N, H, W, 3) in [0, 1]; videos as (N, F, H, W, 3). Plus the final latents."""

    images: np.ndarray | None
    videos: np.ndarray | None
    latents: torch.Tensor | None
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def is_video(self) -> bool:
        return self.videos is not None

    def frames(self) -> np.ndarray:
        """Every output frame as (N*F, H, W, 3): images are one-frame videos here."""
        if self.videos is not None:
            return self.videos.reshape(-1, *self.videos.shape[-3:])
        return self.images


def batch_key(params: GenerationParams) -> tuple:
    """Requests with equal keys can run in one pipeline call: all knobs shared by a call except prompts and seeds."""
    return (params.num_inference_steps, params.guidance_scale, params.true_cfg_scale, params.height, params.width,
            params.num_frames, params.negative_prompt is not None)


def pipeline_kwargs(pipe: Any, batch: list[GenerationParams]) -> dict[str, Any]:
    """The pipeline call's keyword arguments for one or more compatible requests (see `batch_key`), with the
    model's defaults filled in and checked. Each output image gets its own generator, seeded `seed + i` for the
    request's i-th output, so an image's noise does not depend on what else is in the batch."""
    if len({batch_key(p) for p in batch}) != 1:
        raise GenerationParamsError("requests in one batch must share size, steps, guidance and frames")
    params = batch[0]
    adapter = adapter_for(pipe)
    defaults = getattr(pipe, "accel_defaults", None)
    accepted = set(inspect.signature(type(pipe).__call__).parameters)
    values = params.model_dump(exclude_none=True, exclude={"prompt", "negative_prompt", "num_outputs", "seed"})
    kwargs: dict[str, Any] = dict(getattr(defaults, "extra", None) or {})
    for name in ("height", "width", "num_inference_steps", "guidance_scale", "num_frames"):
        if name not in values and defaults is not None and getattr(defaults, name) is not None:
            values[name] = getattr(defaults, name)
    if params.negative_prompt is not None and "negative_prompt" not in accepted:
        raise GenerationParamsError(f"negative_prompt: not supported by {type(pipe).__name__}")
    for name, value in values.items():
        if name not in accepted:
            raise GenerationParamsError(f"{name}: not supported by {type(pipe).__name__} ({adapter.family} family)")
        kwargs[name] = value
    multiple = adapter.size_multiple(pipe)
    for name in ("height", "width"):
        if name in kwargs and kwargs[name] % multiple:
            raise GenerationParamsError(f"{name}: {kwargs[name]} is not a multiple of {multiple} for this model")
    if "num_frames" in kwargs:
        temporal = getattr(pipe, "vae_scale_factor_temporal", 1) or 1
        if (kwargs["num_frames"] - 1) % temporal:
            raise GenerationParamsError(
                f"num_frames: {kwargs['num_frames']} must be {temporal}k+1 for this model (e.g. {temporal + 1})"
            )
    prompts, negatives, generators = [], [], []
    for request in batch:
        for i in range(request.num_outputs):
            prompts.append(request.prompt)
            negatives.append(request.negative_prompt or "")
            generators.append(torch.Generator(device="cpu").manual_seed(request.seed + i))
    kwargs["prompt"] = prompts
    if params.negative_prompt is not None:
        kwargs["negative_prompt"] = negatives
    per_prompt = "num_videos_per_prompt" if "num_videos_per_prompt" in accepted else "num_images_per_prompt"
    kwargs[per_prompt] = 1
    kwargs["generator"] = generators
    return kwargs


def generate(
    pipe: Any,
    params: GenerationParams,
    accel: Any = None,
    *,
    on_step: Callable[[int, int], bool | None] | None = None,
) -> GenerationResult:
    """Run one request under `accelerate(pipe, accel)`.

    on_step(step, total) is called after every denoising step; returning False interrupts the pipeline
    (diffusers' `_interrupt`), so a cancelled request frees the device within one step.
    """
    return generate_batch(pipe, [params], accel, on_step=on_step)[0]


def generate_batch(
    pipe: Any,
    batch: list[GenerationParams],
    accel: Any = None,
    *,
    on_step: Callable[[int, int], bool | None] | None = None,
) -> list[GenerationResult]:
    """Run compatible requests (equal `batch_key`) in one pipeline call; one result per request, in order.
    The accelerator report and the time are the batch's."""
    kwargs = pipeline_kwargs(pipe, batch)
    total = kwargs.get("num_inference_steps") or 0
    captured: dict[str, torch.Tensor] = {}

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        captured["latents"] = callback_kwargs["latents"]
        if on_step is not None and on_step(step + 1, total) is False:
            pipeline._interrupt = True
        return callback_kwargs

    kwargs["callback_on_step_end"] = on_step_end
    kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
    kwargs["output_type"] = "np"
    start = time.perf_counter()
    with torch.inference_mode(), accelerate(pipe, accel, seed=batch[0].seed) as report:
        output = pipe(**kwargs)
    seconds = time.perf_counter() - start
    video = adapter_for(pipe).task == "text-to-video"
    frames = np.asarray(output.frames if video else output.images, dtype=np.float32)
    latents = captured.get("latents")
    results, offset = [], 0
    for request in batch:
        part = slice(offset, offset + request.num_outputs)
        offset += request.num_outputs
        results.append(
            GenerationResult(
                images=None if video else frames[part],
                videos=frames[part] if video else None,
                latents=None if latents is None else latents[part],
                seconds=seconds,
                report=report.as_dict(),
            )
        )
    return results
