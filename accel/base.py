"""The small interface every accelerator implements.

An accelerator is one file with the same parts in the same order: a pydantic config (`MethodConfig` subclass,
discriminated by `method`), its typed `Counters`, its per-call state, hook classes, and `apply_<method>(session,
config) -> MethodHandle`, then its `Method` registry entry. `accel/methods.py` lists the methods and the order in
which they are applied; `accel/session.py` runs them for one pipeline call.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class MethodConfig(BaseModel):
    """Base of every accelerator config: unknown knobs are errors, configs are immutable values."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str
    expert: Literal["both", "high", "low"] = Field(
        "both", description="on two-expert pipelines (Wan 2.2): the transformer the method applies to: \"high\" "
                            "(`transformer`, high noise), \"low\" (`transformer_2`, low noise) or both")

    def unsupported(self, adapter: Any, pipe: Any) -> tuple[str, str] | None:
        """(knob, why) when a knob's value cannot run on this pipeline (its family's adapter, its scheduler) though
        the method as a whole can."""
        return None

    def shorthand(self) -> str:
        """`method:key=value,...` with the knobs that differ from the defaults."""
        knobs = self.model_dump(exclude={"method"}, exclude_defaults=True, mode="json")
        if not knobs:
            return self.method
        return self.method + ":" + ",".join(f"{k}={_short(v)}" for k, v in knobs.items())


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_short(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass
class Counters:
    """Base of a method's work counts for one call (a dataclass per method, read by field name; shown under
    `report.details[method]`). `extra_forwards`: denoiser passes run on top of the pipeline's own calls; a method
    that runs such passes declares it as a field."""

    extra_forwards: ClassVar[int] = 0

    def add(self, other: "Counters") -> None:
        """Add another call's counts to these (the totals of an `accelerate` block): numbers add up, lists are
        concatenated, except fields marked `metadata={"total": "union"}` (e.g. the blocks a plan prunes); texts
        keep the latest non-empty one."""
        for spec in fields(self):
            mine, theirs = getattr(self, spec.name), getattr(other, spec.name)
            if isinstance(mine, list):
                union = spec.metadata.get("total") == "union"
                mine.extend(v for v in theirs if not (union and v in mine))
            elif isinstance(mine, (int, float)) and not isinstance(mine, bool):
                setattr(self, spec.name, mine + theirs)
            elif isinstance(mine, str) and theirs:  # a description of the latest event (e.g. why a fallback)
                setattr(self, spec.name, theirs)


@dataclass
class MethodHandle:
    """What `apply` returns: how to undo the method and what it did during the call.

    Hooks registered through `session.add_hook` are removed by the session; `on_remove` is for anything else
    (e.g. diffusers' `disable_cache`)."""

    counters: Counters = field(default_factory=Counters)
    on_remove: Callable[[], None] | None = None

    def remove(self) -> None:
        if self.on_remove is not None:
            self.on_remove()
            self.on_remove = None


@dataclass(frozen=True)
class Method:
    """A registry entry: the method's name, config class, apply function and one-line summary.

    `exclusive` names a group of methods of which a spec may use only one (e.g. the feature caches, which would
    fight over the same blocks); `conflicts` names methods this one cannot be combined with. Both are checked once,
    in `accel.spec.parse_spec`. `families`: the model families it supports (None: every family an adapter covers).
    `batch_invariant` False: the method decides what to skip from the batch's data (one decision for every item), so
    an item's output may depend on the rest of its batch; the server does not batch such specs.
    """

    name: str
    config_cls: type[MethodConfig]
    apply: Callable[[Any, MethodConfig], MethodHandle]  # (accel.session.AccelSession, config) -> handle
    summary: str
    exclusive: str | None = None
    conflicts: tuple[str, ...] = ()
    families: tuple[str, ...] | None = None
    batch_invariant: bool = True  # an output does not depend on the rest of its batch (False: decisions from data)
    at_attach: bool = False  # apply when the `accelerate` block is entered (methods that patch the pipeline call)
