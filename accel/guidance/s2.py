"""S²-Guidance (arXiv 2508.12880): stochastic self guidance with block-dropping sub-networks.

On an active step the conditional prediction D(c) is computed once more by a *sub-network*: the same transformer
with a random set of blocks made identity (mask m_t drawn fresh every step), giving D̂(c, m_t). The output is
guided away from it:

    D̃ = D(∅) + λ·(D(c) − D(∅)) − ω·(D̂ − D(c))

The pipeline still does its own CFG combine `u + λ·(c' − u)`, so this method returns, for the conditional branch,

    c' = D(c) − (ω/λ)·(D̂ − D(c))      with CFG (λ = the pipeline's CFG scale), and
    c' = D(c) − ω·(D̂ − D(c))          without CFG (guidance-distilled FLUX, or CFG off),

which makes the pipeline's combine yield D̃ exactly (up to float rounding). With `passes` = N > 1, D̂ is the mean of
N sub-networks with independent masks. The unconditional branch is never touched.

Definitions (where the paper is terse):
- drop count: per stack, k = max(1, round(drop_ratio · n_blocks)) blocks (0 when drop_ratio = 0), drawn uniformly
  without replacement among the eligible blocks: never the first block of a stack, never `protected_blocks`.
- interval: the step is active when lo <= σ_t <= hi, with σ_t the scheduler's noise level of the step (flow
  matching: 1 = pure noise, 0 = clean; `timestep / 1000` where the scheduler keeps no sigmas). The default
  (0.1, 0.9) is "the central 80% of the noise levels".
- masks: a `torch.Generator` seeded from (item seed, step index, pass index), per item of the batch (the seed of
  each output: the request's seed + its index), so an output is reproducible and does not depend on the CFG layout
  or on what else is in its batch; items that draw the same mask share one sub-network pass. Seed None counts as
  0. The correction is computed in float32 whatever the model's dtype.
- λ: the model adapter's `cfg_scale`, from the running pipeline call's arguments (recorded by the session at call
  entry). FLUX: `true_cfg_scale` with a negative prompt (its embedded `guidance_scale` is not a combine, so
  without true CFG the no-CFG formula applies); Wan: `guidance_scale`, or Wan 2.2's `guidance_scale_2` below the
  expert boundary; SD3 (one pass over cat([uncond, cond])): `guidance_scale`; only the cond half of the batch is
  corrected and only the cond half is run through the sub-network. SD3's own skip-layer-guidance call
  (`skip_layers=`) is passed through untouched. Another pipeline sharing the accelerated pipeline's transformer
  (`from_pipe`) is not wrapped, so its arguments are unknown: S² then uses the no-CFG weight ω.

Composition with caches: the sub-network pass runs inside this method's call hook (innermost of all call hooks,
so a denoiser-level cache such as AB-Cache stores the corrected output, never D̂). During the pass every block's
`forward` is temporarily replaced by one that enters the block's hook chain *below* every hook registered after
this method (block-level caches: Sortblock, diffusers' FBCache/MagCache), so their per-step state is neither read
nor written; hooks registered before (the session's block counter, per-call pruning) still run. The pass also runs
under its own cache context `"<branch>:s2"`, so any stateful diffusers hook *inside* the blocks (e.g. on attention)
keeps separate state for the sub-network. cache-dit (`dbcache`) owns the block loop itself: declared a conflict.
The pass's block executions are moved out of the session's block counts (which describe the denoiser calls the
pipeline made) into this method's counters: `subnet_blocks_computed`, `subnet_blocks_dropped`; `extra_forwards`
counts sub-network passes (the report sums it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from accel.adapters import parse_block_name, unwrap_denoiser_output
from accel.base import Counters, Method, MethodConfig, MethodHandle
from accel.session import AccelSession, StepContext, restore_forwards, save_forwards


class S2Config(MethodConfig):
    """Knobs of S²-Guidance. Defaults: the paper's (ω 0.25, 10% of blocks, central 80% of noise levels, 1 pass)."""

    method: Literal["s2"] = "s2"
    omega: float = Field(0.25, ge=0.0, le=10.0, description="Weight ω of the self-guidance term. 0 = off (bit-identical). Paper: 0.25.")
    drop_ratio: float = Field(
        0.1, ge=0.0, le=0.9,
        description="Fraction of each stack's blocks dropped in the sub-network: k = max(1, round(ratio * n)); 0 = none.",
    )
    interval: tuple[float, float] = Field(
        (0.1, 0.9),
        description="Active noise levels [lo, hi] of sigma (1 = pure noise, 0 = clean). Default: the central 80%.",
    )
    passes: int = Field(1, ge=1, le=8, description="Sub-network passes per active step, averaged (N). Paper: 1.")
    protected_blocks: list[str] = Field(
        default_factory=list,
        description='Blocks never dropped, as "stack.index" (e.g. "single_transformer_blocks.0"); the first block '
        "of each stack is always protected.",
    )

    @field_validator("interval")
    @classmethod
    def _interval_ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError("interval must be [lo, hi] with 0 <= lo <= hi <= 1 (noise levels)")
        return value

    @model_validator(mode="after")
    def _names_look_like_blocks(self) -> "S2Config":
        for name in self.protected_blocks:
            stack, _, index = name.rpartition(".")
            if not stack or not index.isdigit():
                raise ValueError(f'protected_blocks: {name!r} is not "stack.index"')
        return self


def drop_count(n_blocks: int, drop_ratio: float) -> int:
    if drop_ratio <= 0.0 or n_blocks == 0:
        return 0
    return max(1, round(drop_ratio * n_blocks))


def noise_level(ctx: StepContext) -> float:
    return float(ctx.sigma) if ctx.sigma is not None else float(ctx.timestep) / 1000.0


def is_active(config: S2Config, ctx: StepContext) -> bool:
    lo, hi = config.interval
    return config.omega > 0.0 and lo <= noise_level(ctx) <= hi


def draw_mask(eligible: dict[str, list[int]], sizes: dict[str, int], drop_ratio: float, seed: int | None,
              step: int, pass_index: int) -> dict[str, list[int]]:
    """Blocks to drop per stack for one sub-network pass: reproducible from (seed, step, pass)."""
    base = 0 if seed is None else int(seed)
    mixed = (base * 6364136223846793005 + (step + 1) * 1442695040888963407 + pass_index * 2654435761) % (2**63)
    generator = torch.Generator().manual_seed(mixed)
    mask: dict[str, list[int]] = {}
    for stack, candidates in eligible.items():
        k = min(len(candidates), drop_count(sizes[stack], drop_ratio))
        order = torch.randperm(len(candidates), generator=generator).tolist()
        mask[stack] = sorted(candidates[i] for i in order[:k])
    return mask


@dataclass
class S2Counters(Counters):
    active_steps: int = 0  # calls corrected by a sub-network
    extra_forwards: int = 0  # sub-network passes run
    subnet_blocks_computed: int = 0  # block forwards of those passes
    subnet_blocks_dropped: int = 0  # blocks made identity in those passes


@dataclass
class S2State:
    """Per call: the mask of the running sub-network pass (None outside it)."""

    mask: dict[str, set[int]] | None = None

    def reset(self) -> None:
        self.mask = None


def _subnet_forward(session: AccelSession, state: S2State, stack: str, index: int, entry, module, *args, **kwargs):
    """A block's forward during the sub-network pass: identity if drawn, else the block below later hooks."""
    if index in state.mask.get(stack, ()):
        return session.block_io(module).identity_output(module, args, kwargs)
    return entry(*args, **kwargs)


class S2CallHook:
    """Call hook: after the normal call of the conditional branch, run the sub-network(s) and correct the output."""

    def __init__(self, session: AccelSession, config: S2Config, state: S2State, entries: dict, eligible: dict,
                 counters: S2Counters):
        self.session, self.config, self.state, self.entries = session, config, state, entries
        self.eligible, self.counters = eligible, counters

    def __call__(self, ctx: StepContext, call):
        if ctx.guidance not in ("cond", "batch") or not is_active(self.config, ctx):
            return call()
        keywords = getattr(call, "keywords", None) or {}
        if keywords.get("skip_layers") is not None:  # SD3's own skip-layer-guidance pass
            return call()
        output = call()
        session = self.session
        lam = session.adapter.cfg_scale(session.pipe, session.call_kwargs, ctx.timestep)
        sample, wrap = unwrap_denoiser_output(output)
        batch = sample.shape[0]
        first, count = 0, batch  # the conditional rows: all of them, or one half of a batched-CFG call
        if ctx.guidance == "batch":
            count = batch // 2
            first = 0 if session.adapter.batch_order == "cond_first" else count
        whole = count == batch
        cond = sample[first:first + count].float()
        eligible = {stack: self.eligible[stack] for stack in session.stacks_of[ctx.transformer]}
        total = torch.zeros_like(cond)
        for p in range(self.config.passes):
            # each item's own mask, from its own seed: an item's output does not depend on the rest of its batch
            groups: dict[str, tuple[dict[str, list[int]], list[int]]] = {}
            for item, seed in enumerate(session.item_seeds(count)):
                mask = draw_mask(eligible, session.stack_sizes, self.config.drop_ratio, seed, ctx.step_index, p)
                groups.setdefault(repr(sorted(mask.items())), (mask, []))[1].append(item)
            for mask, items in groups.values():
                rows = None if len(items) == count and whole else [first + i for i in items]
                predicted = self._run_masked(self._subnet_call(call, batch, rows), mask, ctx)
                if predicted.shape[0] != len(items):  # fell back to running the whole batch
                    predicted = predicted[[first + i for i in items]]
                total[items] += predicted.float()
        d_hat = total / self.config.passes
        weight = self.config.omega / lam if lam else self.config.omega  # no combine (or a zero scale): plain ω
        corrected = cond - weight * (d_hat - cond)  # in float32, whatever the model's dtype
        self.counters.active_steps += 1
        if not whole:
            full = sample.float().clone()
            full[first:first + count] = corrected
            corrected = full
        return wrap(corrected.to(sample.dtype))

    def _subnet_call(self, call, batch: int, rows: list[int] | None):
        """A callable running the transformer on the given rows of the call's batch only (the cond half for
        batched CFG, or the items sharing one mask); `rows=None`: the whole call. Tensors the adapter names as
        unbatched (FLUX's position ids) are never cut, whatever their length."""
        if rows is None or not isinstance(call, functools.partial):
            return call
        index = torch.tensor(rows)
        shared = self.session.adapter.unbatched_arguments

        def cut(value):
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                return value[index]
            if isinstance(value, list) and len(value) == batch:  # per-item lists (Z-Image's inputs, Qwen's shapes)
                return [value[i] for i in rows]
            return value

        args = tuple(cut(a) for a in call.args)
        kwargs = {k: v if k in shared else cut(v) for k, v in (call.keywords or {}).items()}
        return functools.partial(call.func, *args, **kwargs)

    def _run_masked(self, subnet, mask: dict[str, list[int]], ctx: StepContext) -> torch.Tensor:
        session, state = self.session, self.state
        state.mask = {stack: set(indices) for stack, indices in mask.items()}
        saved = save_forwards([block for block, _ in self.entries.values()])
        for (stack, index), (block, entry) in self.entries.items():
            block.forward = functools.partial(_subnet_forward, session, state, stack, index, entry, block)
        try:
            with session.side_pass(ctx, f"{ctx.branch}:s2") as side:
                output = subnet()
        finally:
            restore_forwards(saved)
            state.mask = None
        self.counters.subnet_blocks_computed += side.blocks_computed
        self.counters.extra_forwards += 1
        self.counters.subnet_blocks_dropped += sum(len(v) for v in mask.values())
        return unwrap_denoiser_output(output)[0]


def eligible_blocks(session: AccelSession, protected: list[str]) -> dict[str, list[int]]:
    """Per stack, the indices S² may drop; unknown protected names are a SpecError naming the blocks."""
    protected_set = {parse_block_name(name, session.stack_sizes, "s2.protected_blocks") for name in protected}
    return {stack: [i for i in range(1, size) if (stack, i) not in protected_set]
            for stack, size in session.stack_sizes.items()}


def apply_s2(session: AccelSession, config: S2Config) -> MethodHandle:
    eligible = eligible_blocks(session, config.protected_blocks)
    state = S2State()
    counters = S2Counters()
    # each block's forward as it is now: the session's counter and earlier structural hooks, nothing applied later
    entries = {(stack, index): (block, block.forward) for stack, index, block in session.blocks()}
    session.add_call_hook(S2CallHook(session, config, state, entries, eligible, counters))
    return MethodHandle(counters, on_remove=state.reset)


S2 = Method(
    "s2", S2Config, apply_s2,
    "S²-Guidance: guide away from a random block-dropping sub-network; +1 forward per active step (arXiv 2508.12880)",
    conflicts=("dbcache",),  # cache-dit runs the block loop itself: the sub-network cannot drop its blocks
)
