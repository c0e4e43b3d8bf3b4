"""Training-free accelerators for diffusers pipelines.

    import accel, torch
    pipe = accel.load_pipeline("tiny-flux")
    with accel.accelerate(pipe, "fbcache:threshold=0.1") as report:
        image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
    print(report.as_dict())
"""

from accel.apply import accelerate
from accel.session import AccelReport
from accel.errors import AccelError, GenerationParamsError, ModelNotFoundError, SpecError, UnsupportedModelError
from accel.spec import parse_spec

__all__ = [
    "AccelError",
    "AccelReport",
    "GenerationParamsError",
    "ModelNotFoundError",
    "SpecError",
    "UnsupportedModelError",
    "accelerate",
    "load_pipeline",
    "parse_spec",
]


def __getattr__(name):  # on first use: loading imports diffusers pipelines and transformers encoders (~3 s)
    if name == "load_pipeline":
        from accel.loading import load_pipeline

        return load_pipeline
    raise AttributeError(name)
