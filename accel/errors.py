"""Errors a user can cause. All are ValueErrors with a message that names the field or lists what is supported,
so the CLI prints them as one line and the server maps them to a 4xx response."""


class AccelError(ValueError):
    """Base of every user-facing error in `accel`."""


class SpecError(AccelError):
    """An accelerator spec that does not validate (unknown method, bad knob, conflicting methods)."""


class UnsupportedModelError(AccelError):
    """A transformer family or pipeline that no model adapter covers."""


class ModelNotFoundError(AccelError):
    """A model source that is neither a built-in name, a local directory, nor a reachable hub id."""


class GenerationParamsError(AccelError):
    """Bad generation parameters: size not a multiple of the model's factor, steps <= 0, unknown knob for the model."""
