"""Errors a user can cause. All are ValueErrors with a message that names the field or lists what is supported,
so the CLI prints them as one line and the server maps them to a 4xx response naming `field`."""

from __future__ import annotations

from typing import Any


class AccelError(ValueError):
    """Base of every user-facing error in `accel`. `field` names the offending input (e.g. "sortblock.K",
    "height"), or is None when the error is about the request as a whole."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class SpecError(AccelError):
    """An accelerator spec that does not validate (unknown method, bad knob, conflicting methods)."""


class UnsupportedModelError(AccelError):
    """A transformer family or pipeline that no model adapter covers."""


class ModelNotFoundError(AccelError):
    """A model source that is neither a built-in name, a local directory, nor a reachable hub id."""


class GenerationParamsError(AccelError):
    """Bad generation parameters: size not a multiple of the model's factor, steps <= 0, unknown knob for the model."""


def validation_errors(errors: list[dict[str, Any]], prefix: str | None = None) -> tuple[str, str | None]:
    """(message, first field) from pydantic's `ValidationError.errors()`: `field: msg` items joined by "; ", each
    field dotted and prefixed (e.g. "sortblock.K"). The one place pydantic errors are turned into words."""
    parts, first = [], None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", prefix)]
        field = ".".join([prefix, *loc] if prefix else loc) or prefix or "body"
        first = first or field
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")  # our validators' own words
        parts.append(f"{field}: {message}")
    return "; ".join(parts), first
