"""The per-call `prune` method: skip listed or calibrated blocks as identity for one call, weights untouched.

Blocks come from `blocks` ("stack.index" names) or from a plan file (`accel prune calibrate`, see
`accel/pruning/plan.py`) with a `ratio`. The first block of each stack is never skipped. Removing blocks for good
at load time is `accel.pruning.plan.prune_pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diffusers.hooks import ModelHook
from pydantic import Field, ValidationInfo, field_validator, model_validator

from accel.adapters import parse_block_name
from accel.base import Counters, Method, MethodConfig, MethodHandle
from accel.errors import AccelError, SpecError
from accel.pruning.plan import load_plan
from accel.session import AccelSession

PRUNE_HOOK = "accel_prune"


class PruneConfig(MethodConfig):
    """Skip blocks as identity for one call, without touching weights. Give `blocks`, or `plan` (+ `ratio`)."""

    method: Literal["prune"] = "prune"
    blocks: list[str] | None = Field(
        None, description='Blocks to skip, as "stack.index" (e.g. "single_transformer_blocks.3"). Not with plan.'
    )
    plan: str | None = Field(
        None, max_length=200,
        description="Name of a plan configured for the model (server: `prune_plans` in its settings); from the "
        "library, also the path of a plan file from `accel prune calibrate`.",
    )
    ratio: float = Field(0.0, ge=0.0, le=0.9, description="With plan: fraction of all blocks skipped. 0 = none.")
    score: Literal["recommended", "influence", "angular", "drop_one"] = Field(
        "recommended", description="With plan: which calibration score picks the blocks (default: the plan's)."
    )

    @field_validator("plan")
    @classmethod
    def _named_plan(cls, plan: str | None, info: ValidationInfo) -> str | None:
        """Where the caller says which plans exist (`parse_spec(..., plans=...)`: the server), only those names."""
        names = (info.context or {}).get("plans")
        if plan is not None and names is not None and plan not in names:
            listed = ", ".join(sorted(names)) or "none are configured"
            raise ValueError(f"unknown plan {plan!r} (a request names a configured plan, never a path); "
                             f"this model's plans: {listed}")
        return plan

    @model_validator(mode="after")
    def _one_source(self) -> "PruneConfig":
        if (self.blocks is None) == (self.plan is None):
            raise ValueError("give exactly one of blocks (a list of \"stack.index\") or plan (a plan file path)")
        if self.blocks is not None and self.ratio:
            raise ValueError("ratio applies to a plan; with blocks, list the blocks to skip")
        return self


@dataclass
class PruneCounters(Counters):
    pruned: list[str] = field(default_factory=list, metadata={"total": "union"})  # the blocks skipped
    skipped_blocks: int = 0  # block forwards skipped


class PruneBlockHook(ModelHook):
    """Returns the block's inputs in its output structure (identity) instead of running it."""

    def __init__(self, session: AccelSession, counters: PruneCounters):
        super().__init__()
        self.session, self.counters = session, counters

    def new_forward(self, module, *args, **kwargs):
        self.counters.skipped_blocks += 1
        return self.session.block_io(module).identity_output(module, args, kwargs)


def blocks_for_call(session: AccelSession, config: PruneConfig) -> list[str]:
    if config.blocks is not None:
        for name in config.blocks:
            if parse_block_name(name, session.stack_sizes, "prune")[1] == 0:
                raise SpecError(f"prune: {name} is the first block of its stack, which is never pruned",
                                field="prune.blocks")
        return list(dict.fromkeys(config.blocks))
    named = getattr(session.pipe, "accel_prune_plans", {})
    try:
        plan = named[config.plan] if config.plan in named else load_plan(config.plan)
        plan.check(session.transformer)
        return plan.select(config.ratio, config.score)
    except SpecError:
        raise
    except AccelError as exc:
        raise SpecError(str(exc), field="prune.plan") from None


def apply_prune(session: AccelSession, config: PruneConfig) -> MethodHandle:
    counters = PruneCounters(pruned=blocks_for_call(session, config))
    for name in counters.pruned:
        stack, index = parse_block_name(name, session.stack_sizes, "prune")
        session.add_hook(session.stacks[stack][index], PruneBlockHook(session, counters), PRUNE_HOOK)
    return MethodHandle(counters)


PRUNE = Method(
    "prune", PruneConfig, apply_prune,
    "Pruned blocks per call: skip calibrated or listed blocks as identity (ShortGPT / Gromov et al. scores)",
)
