"""Run a pipeline from validated, family-independent generation parameters.

The CLI, the benchmark and the server all generate through `generate_batch()`, so the same request and seed give
the same output everywhere. A request is checked against the model once (`resolve_params`: the model's defaults
filled in; knobs a model does not take, sizes that are not a multiple of the model's factor and frame counts its VAE
cannot encode are errors naming the field); the server does that at admission, and `generate_batch` then only
assembles the call. `model_info` and `frames_for_duration` answer what callers need to know about a model, so they
never reach into `accel.adapters`.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterator

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from accel import accelerate
from accel.adapters import adapter_for
from accel.errors import GenerationParamsError, validation_errors
from accel.loading import ModelDefaults
from accel.spec import AccelSpec, parse_spec

# the knobs of a pipeline call a request sets (the rest: prompts, outputs per prompt, seeds)
CALL_KNOBS = ("num_inference_steps", "guidance_scale", "true_cfg_scale", "height", "width", "num_frames")
_DEFAULTED = ("height", "width", "num_inference_steps", "guidance_scale", "num_frames")


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
            message, first = validation_errors(exc.errors())
            raise GenerationParamsError(message, field=first) from None


class ResolvedParams(GenerationParams):
    """A request checked against one model, its defaults filled in (made by `resolve_params` only)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a caller needs to know about a loaded model: its task, family, generation defaults, the size and
    frame-count rules of its VAE and transformer, and the prune plans a spec may name (`parse_spec(plans=...)`)."""

    task: str
    family: str
    defaults: ModelDefaults
    size_multiple: int  # height and width are multiples of this
    temporal_factor: int  # video frames are temporal_factor * k + 1 (1: any count)
    prune_plans: tuple[str, ...] = ()  # names loaded with `load_pipeline(prune_plans=...)`

    @property
    def fps(self) -> int:
        return self.defaults.fps or 8


def model_info(pipe: Any) -> ModelInfo:
    adapter = adapter_for(pipe)
    return ModelInfo(
        task=adapter.task,
        family=adapter.family,
        defaults=getattr(pipe, "accel_defaults", None) or ModelDefaults(),
        size_multiple=adapter.size_multiple(pipe),
        temporal_factor=getattr(pipe, "vae_scale_factor_temporal", 1) or 1,
        prune_plans=tuple(getattr(pipe, "accel_prune_plans", {})),
    )


def frames_for_duration(pipe: Any, seconds: float, fps: int) -> int:
    """Frames for a clip of `seconds` at `fps`, rounded to a count the model's VAE encodes (k * factor + 1)."""
    temporal = model_info(pipe).temporal_factor
    return max(1, round(seconds * fps / temporal)) * temporal + (1 if temporal > 1 else 0)


@lru_cache(maxsize=None)
def _call_parameters(pipeline_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(pipeline_class.__call__).parameters)


def resolve_params(pipe: Any, params: GenerationParams) -> ResolvedParams:
    """`params` checked against the model, with the model's defaults filled in; done once per request (a no-op on
    `ResolvedParams`), so batching compares what will run and `pipeline_kwargs` need not check again."""
    if isinstance(params, ResolvedParams):
        return params
    info = model_info(pipe)
    accepted = _call_parameters(type(pipe))
    name_of = type(pipe).__name__
    values = params.model_dump(exclude_none=True, include=set(CALL_KNOBS))
    for name in _DEFAULTED:
        if name not in values and getattr(info.defaults, name) is not None:
            values[name] = getattr(info.defaults, name)
    if params.negative_prompt is not None and "negative_prompt" not in accepted:
        raise GenerationParamsError(f"negative_prompt: not supported by {name_of}", field="negative_prompt")
    for name in values:
        if name not in accepted:
            raise GenerationParamsError(f"{name}: not supported by {name_of} ({info.family} family)", field=name)
    for name in ("height", "width"):
        if name in values and values[name] % info.size_multiple:
            raise GenerationParamsError(
                f"{name}: {values[name]} is not a multiple of {info.size_multiple} for this model", field=name
            )
    temporal = info.temporal_factor
    if "num_frames" in values and (values["num_frames"] - 1) % temporal:
        raise GenerationParamsError(
            f"num_frames: {values['num_frames']} must be {temporal}k+1 for this model (e.g. {temporal + 1})",
            field="num_frames",
        )
    return ResolvedParams.model_construct(**{**params.model_dump(), **values})


@dataclass
class GenerationResult:
    """Images as float arrays (N, H, W, 3) in [0, 1]; videos as (N, F, H, W, 3). Plus the final latents."""

    images: np.ndarray | None
    videos: np.ndarray | None
    latents: torch.Tensor | None
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False  # stopped by `on_step`: nothing was decoded, images and videos are None

    @property
    def is_video(self) -> bool:
        return self.videos is not None

    def frames(self) -> np.ndarray:
        """Every output frame as (N*F, H, W, 3): images are one-frame videos here."""
        if self.videos is not None:
            return self.videos.reshape(-1, *self.videos.shape[-3:])
        return self.images


def batch_key(params: GenerationParams) -> tuple:
    """Requests with equal keys can run in one pipeline call: all knobs shared by a call except prompts and seeds.
    Compare resolved requests (`resolve_params`), so a knob left to the model's default equals the default given."""
    return (*(getattr(params, name) for name in CALL_KNOBS), params.negative_prompt is not None)


def pipeline_kwargs(pipe: Any, batch: list[GenerationParams]) -> dict[str, Any]:
    """The pipeline call's keyword arguments for one or more compatible requests (equal `batch_key`), assembled
    from resolved requests (requests not resolved yet are resolved here). Each output image gets its own generator,
    seeded `seed + i` for the request's i-th output, so an image's noise does not depend on the rest of the batch."""
    batch = [resolve_params(pipe, params) for params in batch]
    if len({batch_key(p) for p in batch}) != 1:
        raise GenerationParamsError("requests in one batch must share size, steps, guidance and frames")
    params = batch[0]
    kwargs: dict[str, Any] = dict(model_info(pipe).defaults.extra)
    kwargs.update(params.model_dump(exclude_none=True, include=set(CALL_KNOBS)))
    prompts, negatives, generators = [], [], []
    for request in batch:
        for i in range(request.num_outputs):
            prompts.append(request.prompt)
            negatives.append(request.negative_prompt or "")
            generators.append(torch.Generator(device="cpu").manual_seed(request.seed + i))
    kwargs["prompt"] = prompts
    if params.negative_prompt is not None:
        kwargs["negative_prompt"] = negatives
    accepted = _call_parameters(type(pipe))
    per_prompt = "num_videos_per_prompt" if "num_videos_per_prompt" in accepted else "num_images_per_prompt"
    kwargs[per_prompt] = 1
    kwargs["generator"] = generators
    return kwargs


class _Interrupted(Exception):
    """Raised in place of the VAE decode of an interrupted call: nobody will read its output."""


@contextlib.contextmanager
def _no_decode_after_interrupt(pipe: Any) -> Iterator[None]:
    """Diffusers pipelines still decode after `_interrupt` (the loop only skips its remaining steps); decoding a
    video costs seconds, so an interrupted call stops at the decode instead and the device is free at once."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        yield
        return
    decode, own = vae.decode, vae.__dict__.get("decode")

    def guarded(*args, **kwargs):
        if pipe._interrupt:
            raise _Interrupted
        return decode(*args, **kwargs)

    vae.decode = guarded
    try:
        yield
    finally:
        if own is None:
            del vae.decode  # the instance attribute: the class's method shows through again
        else:
            vae.decode = own


def generate(
    pipe: Any,
    params: GenerationParams,
    spec: AccelSpec | Any = None,
    *,
    on_step: Callable[[int, int], bool | None] | None = None,
) -> GenerationResult:
    """Run one request under `accelerate(pipe, spec)`.

    on_step(step, total) is called after every denoising step; returning False interrupts the pipeline
    (diffusers' `_interrupt`), so a cancelled request frees the device within one step.
    """
    return generate_batch(pipe, [params], spec, on_step=on_step)[0]


def generate_batch(
    pipe: Any,
    batch: list[GenerationParams],
    spec: AccelSpec | Any = None,
    *,
    on_step: Callable[[int, int], bool | None] | None = None,
) -> list[GenerationResult]:
    """Run compatible requests (equal `batch_key`) in one pipeline call; one result per request, in order.
    The accelerator report and the time are the batch's. `spec` is any form `parse_spec` takes; an `AccelSpec`
    is used as is. This call owns `pipe._interrupt`: cleared before and after, so an interrupted call never
    leaks into the next one."""
    spec = parse_spec(spec)
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
    pipe._interrupt = False
    try:
        seeds = [request.seed + i for request in batch for i in range(request.num_outputs)]  # one per output
        with torch.inference_mode(), accelerate(pipe, spec, seed=seeds) as report, _no_decode_after_interrupt(pipe):
            output = pipe(**kwargs)
    except _Interrupted:
        output = None
    finally:
        pipe._interrupt = False
    seconds = time.perf_counter() - start
    if output is None:
        return [GenerationResult(None, None, captured.get("latents"), seconds, report.as_dict(), interrupted=True)
                for _ in batch]
    video = model_info(pipe).task == "text-to-video"
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
