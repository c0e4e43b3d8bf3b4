"""Load a pipeline from a built-in name, a local diffusers directory, or a Hugging Face hub id.

Built-in names build small pipelines offline from configs (`accel.testing.tiny`); local directories and hub ids
go through diffusers' `from_pretrained`, the normal path. Device and dtype default to CUDA + bf16 when a GPU is
present and CPU + fp32 otherwise. The attention backend is one that actually runs here.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from accel.adapters import adapter_for
from accel.errors import AccelError, ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULTS_FILE = "accel_defaults.json"  # written by `accel make-model` beside model_index.json
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


@dataclass
class ModelDefaults:
    """Generation defaults of a model, used when a request leaves a knob out."""

    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    num_frames: int | None = None
    fps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # pipeline kwargs the model needs, e.g. max_sequence_length


DEFAULT_MODEL = "shapes-flux"  # the embedded default of the CLI and the server: trained here, no download


def builtin_models() -> dict[str, Any]:
    """Built-in model names -> their description records: the reference model trained by the project
    (`accel.refmodel`) and the random-weight models built from configs (`accel.testing.tiny`)."""
    from accel.refmodel.model import REFMODELS
    from accel.testing.tiny import BUILTIN_MODELS

    return {**REFMODELS, **BUILTIN_MODELS}


def defaults_of(model: Any) -> ModelDefaults:
    """`ModelDefaults` from a built-in model record."""
    return ModelDefaults(
        height=model.default_height,
        width=model.default_width,
        num_inference_steps=model.default_steps,
        guidance_scale=model.default_guidance,
        num_frames=model.default_frames,
        fps=getattr(model, "default_fps", None) or (8 if model.default_frames else None),
        extra=dict(getattr(model, "pipeline_kwargs", None) or {}),
    )


def _build_builtin(name: str, seed: int = 0):
    return builtin_models()[name].builder(seed)


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
    from diffusers.models.attention_dispatch import AttentionBackendName

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
):
    """A ready pipeline for `source`: a built-in name, a local diffusers directory, or a hub id.

    The pipeline carries `pipe.accel_source` and `pipe.accel_defaults` (a `ModelDefaults`).
    `prune_plan` (a plan file from `accel prune calibrate`) with `prune_ratio` removes that fraction of the
    transformer's blocks for good (before compilation); a plan calibrated on another model is refused.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    builtins = builtin_models()
    path = Path(source).expanduser()
    if source in builtins:
        pipe = _build_builtin(source, seed=seed)
        defaults = defaults_of(builtins[source])
    elif path.is_dir():
        pipe = _from_pretrained(str(path), dtype, local=True)
        defaults = _read_defaults(path)
    elif _HUB_ID.match(source) and not path.exists():
        pipe = _from_pretrained(source, dtype, local=False)
        defaults = ModelDefaults()
    else:
        raise ModelNotFoundError(
            f"model {source!r} not found: not a built-in name ({', '.join(builtins)}), "
            "not a local diffusers directory, not a hub id (org/name)"
        )
    adapter_for(pipe)  # refuse unsupported families early, with the list of supported ones
    if pipe.transformer.dtype != dtype:  # a no-op cast still warns on Wan's fp32-kept modules
        pipe.to(dtype=dtype)
    pipe.to(device)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=not progress)
    pipe.accel_source = source
    pipe.accel_defaults = defaults
    pipe.accel_attention_backend = choose_attention_backend(pipe.transformer, attention_backend, device)
    if prune_plan is not None:
        from accel.pruning.plan import prune_pipeline

        prune_pipeline(pipe, prune_plan, prune_ratio)
    elif prune_ratio:
        raise AccelError("prune_ratio: needs prune_plan (a plan file from `accel prune calibrate`)")
    if compile:
        compile_blocks(pipe)
    return pipe


def _from_pretrained(source: str, dtype: torch.dtype, *, local: bool):
    from diffusers import DiffusionPipeline

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


def own_memory(pipe) -> None:
    """Copy memory-mapped weights into fresh, aligned memory.

    safetensors files are mapped with 8-byte alignment; on CPU, MKL rounds some single-row matmuls differently on
    weights that are not 16-byte aligned, so without the copy a reloaded pipeline can differ from the one saved in
    the last bit, depending on the file's header length.
    """
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                tensor.data = tensor.data.clone()


def _read_defaults(path: Path) -> ModelDefaults:
    file = path / DEFAULTS_FILE
    if not file.is_file():
        return ModelDefaults()
    return ModelDefaults(**json.loads(file.read_text()))


def make_model(name: str, directory: str | Path, *, seed: int = 0) -> Path:
    """Write a built-in model as a standard diffusers directory (plus our defaults file)."""
    builtins = builtin_models()
    if name not in builtins:
        raise ModelNotFoundError(f"unknown built-in model {name!r}; built-ins: {', '.join(builtins)}")
    directory = Path(directory)
    pipe = _build_builtin(name, seed=seed)
    pipe.save_pretrained(directory)
    (directory / DEFAULTS_FILE).write_text(json.dumps(asdict(defaults_of(builtins[name])), indent=2))
    return directory
