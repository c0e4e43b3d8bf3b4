"""What a built or loaded pipeline needs before use: the model's generation defaults as its call defaults, its
weights in memory of its own, eval mode.

**Call defaults.** A diffusers pipeline's call defaults are its family's, not its model's: `FluxPipeline` draws
128 x its VAE factor pixels (2048 px for shapes-flux's factor 16) and pads the T5 prompt to 512 tokens (shapes-flux
was trained on 16), so `pipe("a red circle on the left")` on a model built here gave a blank image. `with_defaults`
makes the model's `ModelDefaults` (size, steps, guidance, frames and extra keyword arguments such as
`max_sequence_length`) the defaults of the plain call, so that call gives the same image as the project's generate
path for the same seed. How:

- the pipeline's class becomes a subclass of its diffusers class (one per class, made once) whose `__call__` fills
  every knob the caller leaves out (or passes as None) from `pipe.accel_defaults`. The subclass keeps the diffusers
  class's name and call signature, so error messages, signature checks and `save_pretrained` (which writes
  `_class_name`) are as for the diffusers class;
- the class is swapped in place, as `accel.session` does for its recording subclass: no component is copied and
  every config value and attribute is kept, whatever the pipeline's source;
- `save_pretrained` also writes the defaults beside `model_index.json` (`DEFAULTS_FILE`). The directory stays a
  standard diffusers checkpoint: `DiffusionPipeline.from_pretrained(dir)` resolves it to the plain diffusers class
  (with diffusers' call defaults), and `accel.load_pipeline(dir)` reads the defaults back and applies them again.

A retrained model with padding masked out would make the text length not matter on its own; the subclass needs no
new weights, and also covers image size, steps and frames.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEFAULTS_FILE", "ModelDefaults", "fill_model_defaults", "own_memory", "prepare", "read_defaults",
           "with_defaults"]

DEFAULTS_FILE = "accel_defaults.json"  # a model's `ModelDefaults`, beside model_index.json


@dataclass
class ModelDefaults:
    """Generation defaults of a model, used when a request (or a plain pipeline call) leaves a knob out."""

    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    num_frames: int | None = None
    fps: int | None = None  # for writing videos; not a pipeline argument
    extra: dict[str, Any] = field(default_factory=dict)  # pipeline kwargs the model needs, e.g. max_sequence_length

    def call_kwargs(self) -> dict[str, Any]:
        """The pipeline-call keyword arguments these defaults set."""
        knobs = {k: v for k, v in asdict(self).items() if k not in ("fps", "extra") and v is not None}
        return {**knobs, **self.extra}


def read_defaults(directory: str | Path) -> ModelDefaults:
    """The defaults saved in `directory` (empty ones when it has no `DEFAULTS_FILE`)."""
    file = Path(directory) / DEFAULTS_FILE
    if not file.is_file():
        return ModelDefaults()
    return ModelDefaults(**json.loads(file.read_text()))


def with_defaults(pipe: Any, defaults: ModelDefaults) -> Any:
    """`pipe`, whose plain call now uses `defaults` for every knob the caller leaves out (see the module's
    docstring); `pipe.accel_defaults` is set. Empty defaults leave the pipeline's class as it is."""
    pipe.accel_defaults = defaults
    if defaults.call_kwargs():
        pipe.__class__ = _with_defaults_class(type(pipe))
    return pipe


def fill_model_defaults(pipe: Any, bound: inspect.BoundArguments) -> None:
    """Fill every knob of a bound pipeline call that the caller left out (or passed as None) from the model's
    defaults (`pipe.accel_defaults`, when it has them)."""
    defaults = getattr(pipe, "accel_defaults", None)
    if defaults is None:
        return
    for name, value in defaults.call_kwargs().items():
        if name in bound.signature.parameters and bound.arguments.get(name) is None:
            bound.arguments[name] = value


@functools.cache
def _with_defaults_class(base: type) -> type:
    signature = inspect.signature(base.__call__)

    def __call__(self, *args, **kwargs):
        bound = signature.bind_partial(self, *args, **kwargs)
        fill_model_defaults(self, bound)
        return base.__call__(*bound.args, **bound.kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        base.save_pretrained(self, save_directory, *args, **kwargs)
        (Path(save_directory) / DEFAULTS_FILE).write_text(json.dumps(asdict(self.accel_defaults), indent=2))

    __call__.__signature__ = signature  # callers check knobs against it (`accel.generate`)
    __call__.__doc__ = base.__call__.__doc__
    return type(
        base.__name__,
        (base,),
        {"__call__": __call__, "save_pretrained": save_pretrained, "__module__": __name__,
         "__doc__": f"{base.__name__} whose call defaults are the model's."},
    )


def own_memory(pipe: Any) -> None:
    """Copy memory-mapped weights into fresh, aligned memory.

    safetensors files are mapped with 8-byte alignment; on CPU, MKL rounds some single-row matmuls (time
    embeddings, AdaLN modulation at batch 1) differently on weights that are not 16-byte aligned, so without the
    copy a reloaded pipeline can differ from the one saved in the last bit, depending on the file's header length.
    """
    for module in _modules(pipe):
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = tensor.data.clone()


def prepare(pipe: Any, progress: bool = False) -> Any:
    """`pipe` with every module in eval mode (modules built from a config start in train mode) and the progress
    bar off unless asked for."""
    for module in _modules(pipe):
        module.eval()
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def _modules(pipe: Any) -> list[torch.nn.Module]:
    return [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
