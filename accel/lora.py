"""LoRA adapters: loaded once per pipeline, chosen per call.

A model's adapters are named local LoRA files (diffusers / PEFT format: what ``FluxPipeline.save_lora_weights``
writes, or a directory holding ``pytorch_lora_weights.safetensors``). ``load_loras(pipe, {name: path})`` checks each
file against the model before loading it: every LoRA weight must name a linear layer the model has, with matching
shapes, so a LoRA trained for another architecture (or another size of the same one) is an `AccelError` naming the
file and the first mismatches, not a silent no-op or a half-loaded adapter. Loading goes through diffusers
(``load_lora_weights(path, adapter_name=name)``, PEFT underneath); afterwards every adapter is disabled.

A call chooses its adapter set: ``with lora_set(pipe, [("star", 0.8)]): pipe(...)`` activates exactly those adapters
at those scales (diffusers' ``set_adapters``: no reload, nothing fused into the weights) and disables them all again
on exit, whatever happens inside. With no adapter requested the LoRA layers are disabled, and PEFT's disabled layer
returns its base layer's output as is: bit-identical to a pipeline with no LoRA loaded.

Scales lie in ``LORA_SCALE_RANGE`` (-2..2; 1 is the adapter as trained, 0 is off, negative pushes away from what it
learned). Names match ``LORA_NAME_PATTERN``; a request names adapters, never a path.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from accel.errors import AccelError

__all__ = [
    "LORA_FILE",
    "LORA_NAME_PATTERN",
    "LORA_SCALE_RANGE",
    "MAX_LORAS_PER_REQUEST",
    "LoraRef",
    "adapter_set",
    "check_lora_file",
    "load_loras",
    "lora_file",
    "lora_names",
    "lora_set",
]

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA file in a directory
LORA_NAME_PATTERN = r"^[A-Za-z0-9][\w.-]{0,63}$"
LORA_SCALE_RANGE = (-2.0, 2.0)
MAX_LORAS_PER_REQUEST = 8
_LORA_KEY = re.compile(r"^(?P<component>transformer|text_encoder)\.(?P<module>.+)\.(?P<part>lora_[AB])(?:\.[\w-]+)?\.weight$")


class LoraRef(BaseModel):
    """One adapter of a request: a name the model was loaded with, and its scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=LORA_NAME_PATTERN, description="an adapter the model offers (`ModelInfo.loras`)")
    scale: float = Field(1.0, ge=LORA_SCALE_RANGE[0], le=LORA_SCALE_RANGE[1],
                         description="strength: 1 as trained, 0 off, in [-2, 2]")


def adapter_set(refs: Iterable[LoraRef]) -> tuple[tuple[str, float], ...]:
    """An adapter set as a hashable key, ((name, scale), ...) in name order: the same set however it is written
    (a batch key, and the key of the profile calibrated with that set)."""
    return tuple(sorted((ref.name, float(ref.scale)) for ref in refs))


def lora_names(pipe: Any) -> tuple[str, ...]:
    """The adapters loaded into `pipe` by `load_loras`, in load order."""
    return tuple(getattr(pipe, "accel_loras", {}))


def lora_file(path: str | Path) -> Path:
    """The LoRA file at `path`: the file itself, or ``LORA_FILE`` (else the one ``.safetensors``) in a directory."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / LORA_FILE).is_file():
            return path / LORA_FILE
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise AccelError(f"LoRA {path}: a directory needs {LORA_FILE} (or exactly one .safetensors file), "
                         f"found {len(found)}")
    raise AccelError(f"LoRA {path}: no such file or directory")


def _read(pipe: Any, file: Path) -> dict[str, torch.Tensor]:
    """The file's state dict in diffusers' key format (the pipeline's own converter: kohya, PEFT, ... formats)."""
    try:
        state = pipe.lora_state_dict(str(file))
    except Exception as exc:  # noqa: BLE001 - unreadable file, unknown format: one message naming the file
        raise AccelError(f"LoRA {file}: not a LoRA file this pipeline reads: {_first_line(exc)}") from None
    state = state[0] if isinstance(state, tuple) else state
    if not isinstance(state, dict) or not state:
        raise AccelError(f"LoRA {file}: holds no LoRA weights")
    return state


def check_lora_file(pipe: Any, path: str | Path) -> Path:
    """`path`'s LoRA file, checked against `pipe`: every weight is a ``lora_A``/``lora_B`` of a linear layer of the
    transformer (or the first text encoder) that exists, with matching shapes. Raises `AccelError` naming the file
    and the first mismatches (a LoRA for another architecture or another model size)."""
    file = lora_file(path)
    if not hasattr(pipe, "load_lora_weights"):
        raise AccelError(f"LoRA {file}: {type(pipe).__name__} does not take LoRA adapters")
    state = _read(pipe, file)
    problems: list[str] = []
    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            problems.append(f"{key}: not a LoRA weight of the transformer or text encoder")
            continue
        component = getattr(pipe, match["component"], None)
        module = _find(component, match["module"]) if component is not None else None
        if not isinstance(module, torch.nn.Linear):
            kind = "no such layer" if module is None else f"a {type(module).__name__}, not a linear layer"
            problems.append(f"{key}: {kind} in the model's {match['component']}")
            continue
        a = match["part"] == "lora_A"
        wanted, got = (module.in_features if a else module.out_features), tensor.shape[1 if a else 0]
        if tensor.ndim != 2 or got != wanted:
            side = "in" if a else "out"
            problems.append(f"{key}: shape {tuple(tensor.shape)} does not fit the layer ({side}_features {wanted})")
        if len(problems) >= 3:
            break
    if problems:
        raise AccelError(f"LoRA {file} does not match the model ({type(pipe.transformer).__name__}): "
                         + "; ".join(problems))
    return file


def _find(root: torch.nn.Module, dotted: str) -> torch.nn.Module | None:
    """The linear layer at `dotted` under `root` (through a LoRA wrapper's ``base_layer`` when already wrapped)."""
    module = root
    for part in dotted.split("."):
        module = getattr(module, part, None) if not part.isdigit() else _index(module, int(part))
        if module is None:
            return None
    return getattr(module, "base_layer", module)


def _index(module: Any, i: int) -> Any:
    try:
        return module[i]
    except (TypeError, IndexError, KeyError):
        return None


def load_loras(pipe: Any, loras: Mapping[str, str | Path]) -> dict[str, str]:
    """Load each named LoRA (`check_lora_file` first) with ``load_lora_weights(file, adapter_name=name)``; then
    disable every adapter (a call enables its own with `lora_set`). Records ``pipe.accel_loras`` ({name: file})."""
    loaded: dict[str, str] = dict(getattr(pipe, "accel_loras", {}))
    for name, path in loras.items():
        if not re.fullmatch(LORA_NAME_PATTERN, name):
            raise AccelError(f"loras: adapter name {name!r} must match {LORA_NAME_PATTERN}", field="loras")
        if name in loaded:
            raise AccelError(f"loras.{name}: an adapter of that name is already loaded ({loaded[name]})",
                             field=f"loras.{name}")
        file = check_lora_file(pipe, path)
        try:
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - what the checks above did not foresee: still name the file
            raise AccelError(f"LoRA {file} (adapter {name!r}) failed to load: {_first_line(exc)}",
                             field=f"loras.{name}") from None
        if name not in {a for names in pipe.get_list_adapters().values() for a in names}:
            raise AccelError(f"LoRA {file} (adapter {name!r}): no layer of the model took its weights",
                             field=f"loras.{name}")
        loaded[name] = str(file)
    pipe.accel_loras = loaded
    if loaded:
        pipe.disable_lora()
    return loaded


def _refs(refs: Iterable[LoraRef | tuple[str, float] | Mapping[str, Any]]) -> list[tuple[str, float]]:
    out = []
    for ref in refs:
        if isinstance(ref, LoraRef):
            out.append((ref.name, ref.scale))
        elif isinstance(ref, Mapping):
            out.append((ref["name"], float(ref.get("scale", 1.0))))
        else:
            name, scale = ref
            out.append((name, float(scale)))
    return out


@contextlib.contextmanager
def lora_set(pipe: Any, refs: Sequence[LoraRef | tuple[str, float] | Mapping[str, Any]] | None) -> Iterator[list]:
    """Activate exactly `refs` ((name, scale) pairs or `LoraRef`s) for the calls inside; all adapters disabled
    again on exit. With no refs the adapters stay disabled (the base model, bit for bit). Yields the pairs."""
    pairs = _refs(refs or ())
    available = lora_names(pipe)
    unknown = [name for name, _ in pairs if name not in available]
    if unknown:
        offered = ", ".join(available) or "none"
        raise AccelError(f"lora: unknown adapter {unknown[0]!r}; this model offers: {offered}", field="lora")
    if not pairs:
        yield pairs
        return
    pipe.enable_lora()
    try:
        pipe.set_adapters([name for name, _ in pairs], [scale for _, scale in pairs])
        yield pairs
    finally:
        pipe.disable_lora()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
