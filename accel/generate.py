"""Run a pipeline from validated, family-independent generation parameters.

The CLI, the benchmark and the server all generate through `generate_batch()`, so the same request and seed give
the same output everywhere. A request is checked against the model once (`resolve_params`: the model's defaults
filled in; knobs a model does not take, sizes that are not a multiple of the model's factor and frame counts its VAE
cannot encode are errors naming the field); the server does that at admission, and `generate_batch` then only
assembles the call. `model_info` and `frames_for_duration` answer what callers need to know about a model, so they
never reach into `accel.adapters`.

Input images (`GenerationParams.images`, PIL) make a request an edit (FLUX.1 Kontext, Qwen-Image-Edit, FLUX.2 with
reference images) or an image-to-video request (Wan I2V, HunyuanVideo 1.5 I2V): the model's tasks say which it
takes and how many (`ModelInfo.tasks`, `ModelInfo.max_images`). A request with input images runs alone in its
pipeline call (`runs_alone`): one prompt, its outputs as `num_images_per_prompt`, so inputs are never mixed.

LoRA adapters (`GenerationParams.lora`: names the model was loaded with, scales in `LORA_SCALE_RANGE`) are part of
the batch key: a batch shares one adapter set, activated for its call only (`accel.lora.lora_set`); with none the
output is bit-identical to the model without adapters.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from accel import accelerate
from accel.adapters import adapter_for, pipeline_max_images, pipeline_tasks
from accel.errors import GenerationParamsError, validation_errors
from accel.loading import ModelDefaults
from accel.lora import LORA_SCALE_RANGE, MAX_LORAS_PER_REQUEST, LoraRef, adapter_set, lora_names, lora_set
from accel.spec import AccelSpec, parse_spec

# the knobs of a pipeline call a request sets (the rest: prompts, outputs per prompt, seeds)
CALL_KNOBS = ("num_inference_steps", "guidance_scale", "true_cfg_scale", "height", "width", "num_frames")
_DEFAULTED = ("height", "width", "num_inference_steps", "guidance_scale", "num_frames")
TEXT_TASKS = frozenset({"text-to-image", "text-to-video"})  # tasks that need no input image
IMAGE_TASKS = frozenset({"image-edit", "image-to-video"})  # tasks that take input images (`image=`)
MAX_INPUT_IMAGES = 16  # what GenerationParams accepts at all; each model takes fewer (`ModelInfo.max_images`)


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
    images: list[Any] = Field(default_factory=list, max_length=MAX_INPUT_IMAGES, description=(
        "Input images (PIL, converted to RGB): the image to edit and any reference images, or the first frame of "
        "an image-to-video model."))
    mask: Any = Field(None, description="PIL mask (converted to L): where the image may change (pipelines that "
                      "take `mask_image` only).")
    lora: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS_PER_REQUEST, description=(
        f"LoRA adapters for this request, by the names the model was loaded with, each with a scale in "
        f"[{LORA_SCALE_RANGE[0]:g}, {LORA_SCALE_RANGE[1]:g}] (1: as trained); empty: the base model, bit for bit."))

    @field_validator("images")
    @classmethod
    def _rgb_images(cls, images: list[Any]) -> list[Image.Image]:
        return [_pil(image, "RGB", f"image[{i}]") for i, image in enumerate(images)]

    @field_validator("mask")
    @classmethod
    def _grey_mask(cls, mask: Any) -> Image.Image | None:
        return None if mask is None else _pil(mask, "L", "mask")

    @classmethod
    def parse(cls, **values: Any) -> "GenerationParams":
        """Validate, turning pydantic's errors into one `GenerationParamsError` that names each field."""
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            message, first = validation_errors(exc.errors())
            # list items as `lora[0].scale`, the way a request writes them
            message, first = (re.sub(r"\b(lora|images)\.(\d+)\b", r"\1[\2]", text) for text in (message, first))
            raise GenerationParamsError(message, field=first) from None


def _pil(image: Any, mode: str, name: str) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL image, not {type(image).__name__}")
    if not image.width or not image.height:
        raise ValueError(f"{name} has no pixels")
    return image if image.mode == mode else image.convert(mode)


class ResolvedParams(GenerationParams):
    """A request checked against one model, its defaults filled in (made by `resolve_params` only)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a caller needs to know about a loaded model: its tasks (the first is its main one), family, generation
    defaults, the size and frame-count rules of its VAE and transformer, how many input images it takes, and the
    prune plans a spec may name (`parse_spec(plans=...)`)."""

    task: str  # tasks[0]
    family: str
    defaults: ModelDefaults
    size_multiple: int  # height and width are multiples of this
    temporal_factor: int  # video frames are temporal_factor * k + 1 (1: any count)
    prune_plans: tuple[str, ...] = ()  # names loaded with `load_pipeline(prune_plans=...)`
    tasks: tuple[str, ...] = ()  # text-to-image, text-to-video, image-edit, image-to-video
    max_images: int = 0  # input images one call takes (0: none)
    loras: tuple[str, ...] = ()  # LoRA adapters a request may name (`GenerationParams.lora`)

    @property
    def fps(self) -> int:
        return self.defaults.fps or 8

    @property
    def is_video(self) -> bool:
        return any(task.endswith("-video") for task in self.tasks)

    @property
    def needs_image(self) -> bool:
        """Every task of the model starts from an input image (an edit or image-to-video model)."""
        return not TEXT_TASKS & set(self.tasks)


def model_info(pipe: Any) -> ModelInfo:
    adapter = adapter_for(pipe)
    tasks = tuple(pipeline_tasks(pipe))
    return ModelInfo(
        task=tasks[0],
        tasks=tasks,
        max_images=pipeline_max_images(pipe) if IMAGE_TASKS & set(tasks) else 0,
        family=adapter.family,
        defaults=getattr(pipe, "accel_defaults", None) or ModelDefaults(),
        size_multiple=adapter.size_multiple(pipe),
        temporal_factor=getattr(pipe, "vae_scale_factor_temporal", 1) or 1,
        prune_plans=tuple(getattr(pipe, "accel_prune_plans", {})),
        loras=lora_names(pipe),
    )


def frames_for_duration(pipe: Any, seconds: float, fps: int) -> int:
    """Frames for a clip of `seconds` at `fps`, rounded to a count the model's VAE encodes (k * factor + 1)."""
    temporal = model_info(pipe).temporal_factor
    return max(1, round(seconds * fps / temporal)) * temporal + (1 if temporal > 1 else 0)


@contextlib.contextmanager
def _after_scheduler_steps(pipe: Any, on_step_end: Callable) -> Iterator[None]:
    """For pipelines without `callback_on_step_end`: call `on_step_end` after each `pipe.scheduler.step` of the
    call (its new latents as "latents"), through an instance attribute removed on exit."""
    scheduler = pipe.scheduler
    original = scheduler.step
    count = [0]

    def step(*args, **kwargs):
        output = original(*args, **kwargs)
        latents = output[0] if isinstance(output, tuple) else output.prev_sample
        on_step_end(pipe, count[0], None, {"latents": latents})
        count[0] += 1
        return output

    scheduler.step = step
    try:
        yield
    finally:
        scheduler.__dict__.pop("step", None)


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
    _check_inputs(pipe, params, info, accepted)
    values["lora"] = _check_lora(params.lora, info, name_of)
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


def _check_lora(refs: list[LoraRef], info: ModelInfo, name_of: str) -> list[LoraRef]:
    """The request's adapters against the model's (errors name `lora`, `lora[i].name`), sorted by name: the same
    set written in another order is the same batch and the same output."""
    if refs and not info.loras:
        raise GenerationParamsError(f"lora: this model ({name_of}) has no LoRA adapters", field="lora")
    seen: set[str] = set()
    for i, ref in enumerate(refs):
        if ref.name not in info.loras:
            raise GenerationParamsError(f"lora[{i}].name: unknown adapter {ref.name!r}; this model offers: "
                                        f"{', '.join(info.loras)}", field=f"lora[{i}].name")
        if ref.name in seen:
            raise GenerationParamsError(f"lora[{i}].name: adapter {ref.name!r} is given twice",
                                        field=f"lora[{i}].name")
        seen.add(ref.name)
    return sorted(refs, key=lambda ref: ref.name)


def _check_inputs(pipe: Any, params: GenerationParams, info: ModelInfo, accepted: frozenset[str]) -> None:
    """The input images and mask against what the model takes (errors name `image` or `mask`): how many, each side
    at least the model's size multiple, and the pipeline's own image checks where it has them (FLUX.2's
    `image_processor.check_image_input`: minimum side, aspect ratio)."""
    name_of, count, tasks = type(pipe).__name__, len(params.images), ", ".join(info.tasks)
    if count and not info.max_images:
        raise GenerationParamsError(f"image: {name_of} takes no input image ({tasks})", field="image")
    if not count and info.needs_image:
        raise GenerationParamsError(f"image: {name_of} ({tasks}) needs an input image", field="image")
    if count > info.max_images:
        raise GenerationParamsError(f"image: {name_of} takes at most {info.max_images} input image"
                                    f"{'s' if info.max_images > 1 else ''}, got {count}", field="image")
    check = getattr(getattr(pipe, "image_processor", None), "check_image_input", None)
    for image in params.images:
        if min(image.size) < info.size_multiple:
            raise GenerationParamsError(f"image: {image.width}x{image.height} is too small for this model (each "
                                        f"side at least {info.size_multiple} pixels)", field="image")
        try:
            if check is not None:
                check(image)
        except ValueError as exc:
            raise GenerationParamsError(f"image: {exc}", field="image") from None
    if params.mask is not None:
        if "mask_image" not in accepted:
            raise GenerationParamsError(f"mask: not supported by {name_of}", field="mask")
        if not count:
            raise GenerationParamsError("mask: a mask needs an input image", field="mask")


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
    Compare resolved requests (`resolve_params`), so a knob left to the model's default equals the default given.
    Requests with input images also differ from those without; they run alone all the same (`runs_alone`). The
    LoRA adapter set (names and scales) is part of the key: one call runs one set."""
    return (*(getattr(params, name) for name in CALL_KNOBS), params.negative_prompt is not None, runs_alone(params),
            adapter_set(params.lora))


def runs_alone(params: GenerationParams) -> bool:
    """Whether the request needs a pipeline call of its own: one with input images does (a call conditions every
    output on the same images, and multi-image pipelines such as Qwen-Image-Edit-Plus take one prompt per call)."""
    return bool(params.images) or params.mask is not None


def pipeline_kwargs(pipe: Any, batch: list[GenerationParams]) -> dict[str, Any]:
    """The pipeline call's keyword arguments for one or more compatible requests (equal `batch_key`), assembled
    from resolved requests (requests not resolved yet are resolved here). Each output image gets its own generator,
    seeded `seed + i` for the request's i-th output, so an image's noise does not depend on the rest of the batch."""
    batch = [resolve_params(pipe, params) for params in batch]
    if len({batch_key(p) for p in batch}) != 1:
        raise GenerationParamsError("requests in one batch must share size, steps, guidance, frames and LoRA adapters")
    params = batch[0]
    info = model_info(pipe)
    kwargs: dict[str, Any] = dict(info.defaults.extra)
    kwargs.update(params.model_dump(exclude_none=True, include=set(CALL_KNOBS)))
    accepted = _call_parameters(type(pipe))
    per_prompt = "num_videos_per_prompt" if "num_videos_per_prompt" in accepted else "num_images_per_prompt"
    if runs_alone(params):
        if len(batch) > 1:
            raise GenerationParamsError("a request with input images runs alone in its pipeline call")
        return _image_call_kwargs(kwargs, params, info, per_prompt, accepted)
    prompts, negatives, generators = [], [], []
    for request in batch:
        for i in range(request.num_outputs):
            prompts.append(request.prompt)
            negatives.append(request.negative_prompt or "")
            generators.append(torch.Generator(device="cpu").manual_seed(request.seed + i))
    kwargs["prompt"] = prompts
    if params.negative_prompt is not None:
        kwargs["negative_prompt"] = negatives
    kwargs[per_prompt] = 1
    kwargs["generator"] = generators
    return kwargs


def _image_call_kwargs(kwargs: dict[str, Any], params: ResolvedParams, info: ModelInfo, per_prompt: str,
                       accepted: frozenset[str]) -> dict[str, Any]:
    """One request with input images: one prompt, its outputs per prompt (each with its generator, seeded
    `seed + i`), `image=` as the pipeline takes it (a list where it takes several, else the one image) and
    `mask_image=`. A pipeline that sizes its output by area (FLUX.1 Kontext's `max_area`, taking only the aspect
    ratio from height and width) gets the requested size's area, so the output has the requested size."""
    kwargs["prompt"] = params.prompt
    if params.negative_prompt is not None:
        kwargs["negative_prompt"] = params.negative_prompt
    kwargs[per_prompt] = params.num_outputs
    kwargs["generator"] = [torch.Generator(device="cpu").manual_seed(params.seed + i)
                           for i in range(params.num_outputs)]
    kwargs["image"] = list(params.images) if info.max_images > 1 else params.images[0]
    if params.mask is not None:
        kwargs["mask_image"] = params.mask
    if "max_area" in accepted and params.height and params.width:
        kwargs["max_area"] = params.height * params.width
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


def resolve_request_target(pipe: Any, spec: AccelSpec, params: GenerationParams,
                           allowed: Callable[[AccelSpec], bool] | None = None) -> AccelSpec:
    """A spec's fidelity target resolved on the model's calibrated profile at the request's size, steps and frames
    (`accel.calibration.target`); `allowed` may refuse settings. A spec without a target is returned as is."""
    from accel.calibration.target import resolve_target

    if spec.target is None:
        return spec
    params = resolve_params(pipe, params)
    return resolve_target(pipe, spec.target, height=params.height, width=params.width,
                          steps=params.num_inference_steps, frames=params.num_frames, allowed=allowed,
                          lora=params.lora)


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
    leaks into the next one. The batch's LoRA adapters (one set, shared by every request: `batch_key`) are active
    for this call only; the report's `lora` lists them ([] for the base model)."""
    spec = parse_spec(spec)
    batch = [resolve_params(pipe, params) for params in batch]
    if spec.target is not None:  # a fidelity target: chosen on the model's profile at this request's size and steps
        spec = resolve_request_target(pipe, spec, batch[0])
    kwargs = pipeline_kwargs(pipe, batch)
    adapters = batch[0].lora
    assert all(adapter_set(p.lora) == adapter_set(adapters) for p in batch), "a batch shares one LoRA adapter set"
    total = kwargs.get("num_inference_steps") or 0
    captured: dict[str, torch.Tensor] = {}

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        captured["latents"] = callback_kwargs["latents"]
        if on_step is not None and on_step(step + 1, total) is False:
            pipeline._interrupt = True
        return callback_kwargs

    step_hook: contextlib.AbstractContextManager = contextlib.nullcontext()
    if "callback_on_step_end" in _call_parameters(type(pipe)):
        kwargs["callback_on_step_end"] = on_step_end
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
    else:  # HunyuanVideo 1.5 takes no step callback: the scheduler's step marks the end of a step
        step_hook = _after_scheduler_steps(pipe, on_step_end)
    kwargs["output_type"] = "np"
    start = time.perf_counter()
    pipe._interrupt = False
    try:
        seeds = [request.seed + i for request in batch for i in range(request.num_outputs)]  # one per output
        with torch.inference_mode(), lora_set(pipe, adapters), accelerate(pipe, spec, seed=seeds) as report, \
                _no_decode_after_interrupt(pipe), step_hook:
            output = pipe(**kwargs)
    except _Interrupted:
        output = None
    finally:
        pipe._interrupt = False
    seconds = time.perf_counter() - start
    ran = [{"name": ref.name, "scale": ref.scale} for ref in adapters]
    if output is None:
        return [GenerationResult(None, None, captured.get("latents"), seconds, {**report.as_dict(), "lora": ran},
                                 interrupted=True) for _ in batch]
    video = model_info(pipe).is_video
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
                report={**report.as_dict(), "lora": ran},
            )
        )
    return results
