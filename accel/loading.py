"""Load a pipeline from a built-in name, a local diffusers directory, or a Hugging Face hub id.

Built-in names come from `accel.models.registry` (the trained shapes-flux with its weights in the package, and
random-weight models built offline from configs); local directories and hub ids go through diffusers'
`from_pretrained`, the normal path. Either way the pipeline's plain call gets the model's defaults
(`accel.models.pipelines.with_defaults`). Device and dtype default to CUDA + bf16 when a GPU is present and
CPU + fp32 otherwise. The attention backend is one that actually runs here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_dispatch import AttentionBackendName

from accel.adapters import adapter_for
from accel.calibration.profile import attach_builtin_profile, attach_profile
from accel.errors import AccelError, ModelNotFoundError
from accel.lora import load_loras
from accel.models.pipelines import DEFAULTS_FILE, ModelDefaults, own_memory, prepare, read_defaults, with_defaults
from accel.models.registry import BUILTIN_MODELS, DEFAULT_MODEL, build_pipeline, builtin_models
from accel.pruning.plan import load_plans, prune_pipeline

__all__ = [
    "DEFAULTS_FILE",
    "DEFAULT_MODEL",
    "ModelDefaults",
    "builtin_models",
    "compile_blocks",
    "load_pipeline",
    "make_model",
    "own_memory",
    "xformers_runs",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AccelError("device: CUDA was requested but no CUDA device is available")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise AccelError(f"dtype: unknown {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def xformers_runs(device: torch.device) -> bool:
    """True only if xformers' attention actually runs on `device` (its wheel imports on CPU but cannot run)."""
    try:
        import xformers.ops as xops

        q = torch.randn(1, 8, 1, 16, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
        xops.memory_efficient_attention(q, q, q)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


def choose_attention_backend(transformer: torch.nn.Module, requested: str | None, device: torch.device) -> str:
    """Set a usable attention backend; return its name. `None` keeps diffusers' default (torch SDPA, "native")."""
    if requested in (None, "native", "auto"):
        return "native"
    known = [b.value for b in AttentionBackendName]
    if requested not in known:
        raise AccelError(f"attention_backend: unknown {requested!r}; known: {', '.join(known)}")
    if requested == "xformers" and not xformers_runs(device):
        raise AccelError(f"attention_backend: xformers is not usable on {device.type} here (CUDA only)")
    try:
        transformer.set_attention_backend(requested)
    except Exception as exc:  # noqa: BLE001 - diffusers raises various errors for missing requirements
        raise AccelError(f"attention_backend: {requested!r} is not usable here: {exc}") from None
    return requested


def compile_blocks(pipe: Any) -> None:
    """Compile each transformer block's own forward with torch.compile (regional compilation).

    The compiled region is the block alone; our hooks wrap it from the outside, so every skip decision stays in
    Python between blocks and never causes a recompilation or a graph break.
    """
    adapter = adapter_for(pipe)
    for blocks in adapter.block_stacks(pipe.transformer).values():
        for block in blocks:
            block.forward = torch.compile(block.forward, dynamic=False)


def load_pipeline(
    source: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    compile: bool = False,
    attention_backend: str | None = None,
    progress: bool = False,
    seed: int = 0,
    prune_plan: str | Path | None = None,
    prune_ratio: float = 0.0,
    prune_plans: dict[str, str | Path] | None = None,
    loras: dict[str, str | Path] | None = None,
    builtin_loras: bool = True,
    profile: str | Path | Sequence[str | Path] | None = None,
):
    """A ready pipeline for `source`: a built-in name, a local diffusers directory, or a hub id.

    The pipeline carries `pipe.accel_source` and `pipe.accel_defaults` (a `ModelDefaults`), which are also the
    defaults of its plain call. `prune_plan` (a plan file from `accel prune calibrate`) with `prune_ratio` removes
    that fraction of the transformer's blocks for good (before compilation); a plan calibrated on another model is
    refused. `prune_plans` ({name: plan file}) are the plans per-call pruning may name (`prune:plan=<name>`),
    checked against the (possibly pruned) model now. `loras` ({name: LoRA file or directory}) are the LoRA adapters
    calls may activate by name (`GenerationParams.lora`), loaded now (a file that does not fit the model is an
    `AccelError` naming it) and disabled; a built-in model's own adapters (`BuiltinModel.loras`) come first unless
    `builtin_loras` is False. `pipe.accel_loras` lists them. `profile` (from `accel calibrate`; or several: the base
    model's and one per LoRA adapter set) is checked against the model's fingerprint and attached for fidelity
    targets; a built-in model first gets its shipped ones (`accel/models/profiles/<name>[+<adapter>].json`) when they
    match the loaded weights, and a given profile replaces the shipped one of its adapter set.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path = Path(source).expanduser()
    if source in BUILTIN_MODELS:
        pipe = build_pipeline(source, seed=seed)
        defaults = BUILTIN_MODELS[source].defaults()
    elif path.is_dir():
        pipe = _from_pretrained(str(path), dtype, local=True)
        defaults = read_defaults(path)
    elif _HUB_ID.match(source) and not path.exists():
        pipe = _from_pretrained(source, dtype, local=False)
        defaults = ModelDefaults()
    else:
        raise ModelNotFoundError(
            f"model {source!r} not found: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
            "not a local diffusers directory, not a hub id (org/name)"
        )
    adapter_for(pipe)  # refuse unsupported families early, with the list of supported ones
    if pipe.transformer.dtype != dtype:  # a no-op cast still warns on Wan's fp32-kept modules
        pipe.to(dtype=dtype)
    pipe.to(device)
    prepare(pipe, progress=progress)
    with_defaults(pipe, defaults)
    pipe.accel_source = source
    choose_attention_backend(pipe.transformer, attention_backend, device)
    own = dict(BUILTIN_MODELS[source].loras) if source in BUILTIN_MODELS and builtin_loras else {}
    clash = sorted(set(own) & set(loras or {}))
    if clash:
        raise AccelError(f"loras.{clash[0]}: {source} already has a built-in adapter of that name", field="loras")
    load_loras(pipe, {**own, **(loras or {})})  # before pruning: a LoRA fits the whole model
    if prune_plan is not None:
        prune_pipeline(pipe, prune_plan, prune_ratio)
    elif prune_ratio:
        raise AccelError("prune_ratio: needs prune_plan (a plan file from `accel prune calibrate`)")
    load_plans(pipe, prune_plans or {})
    if source in BUILTIN_MODELS:
        attach_builtin_profile(pipe, source)  # the shipped profiles, when they match these weights
    for one in [] if profile is None else [profile] if isinstance(profile, (str, Path)) else profile:
        attach_profile(pipe, one)  # given profiles replace shipped ones; refused when calibrated on another model
    if compile:
        compile_blocks(pipe)
    return pipe


def _from_pretrained(source: str, dtype: torch.dtype, *, local: bool):
    if local and not (Path(source) / "model_index.json").is_file():
        raise ModelNotFoundError(f"model {source!r}: directory has no model_index.json (not a diffusers pipeline)")
    try:
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, local_files_only=local)
    except Exception as exc:  # noqa: BLE001 - hub, network and format errors all become one clear message
        where = "local directory" if local else "Hugging Face Hub (offline, or no such repository?)"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"model {source!r}: could not load from the {where}: {first_line}") from None
    own_memory(pipe)
    return pipe


def make_model(name: str, directory: str | Path, *, seed: int = 0) -> Path:
    """Write a built-in model as a standard diffusers directory, plus its defaults (`DEFAULTS_FILE`)."""
    directory = Path(directory)
    with_defaults(build_pipeline(name, seed=seed), BUILTIN_MODELS[name].defaults()).save_pretrained(directory)
    return directory
