"""Sortblock (arXiv 2508.00412): similarity-ranked block-wise residual reuse with linear prediction.

Inside a window of the trajectory (timesteps `start` >= t >= `end`, or a fraction of the steps), calls are grouped
in intervals of `K`:
- call c % K == 0 (full): every block runs; each block's residual r = out - in is stored (both streams of FLUX
  blocks) and its first-order Taylor factor (the change per step) updated.
- call c % K == 1 (rank): blocks marked at the previous ranking run (all blocks before the first ranking); the
  others add their predicted residual r(s_k) + (s - s_k) * dr/ds. At the end of the call each block's stored
  full-step residual is compared with the residual it used now (cosine, fp32, first 1/8 of the channels, mean
  over tokens); per stack, the fraction rho_t of least similar (fastest changing) blocks is marked for
  recomputation until the next ranking: threshold = sorted(similarity)[int(N * rho_t)], marked if <= threshold.
- other calls (partial): marked blocks run, the others are predicted.
rho_t = beta * poly5(t) with the authors' coefficients (t on the 0..1000 scale), clipped to [0, 1].
Outside the window every block runs. State is per CFG branch (diffusers cache context) and per call.

Choices where the paper is silent, documented: the ranking is one per batch (similarities are averaged over
items, since a block either runs for the whole batch or not), while each item's prediction uses only its own
residuals; a block that runs at a partial step also refreshes its stored
residual and Taylor factor (the newest data gives the better prediction); ranking uses the image stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from pydantic import Field, model_validator

from accel.base import Counters, Method, MethodConfig, MethodHandle
from accel.session import AccelSession, StepContext

SORTBLOCK_HOOK = "accel_sortblock"

# The authors' degree-5 schedule for rho_t (highest power first), t in 0..1000.
RHO_POLY5 = (5.67621e-14, -1.36659e-10, 1.16246e-7, -3.97725e-5, 0.00361, 0.56088)


class SortblockConfig(MethodConfig):
    """Knobs of Sortblock. Defaults: the authors' FLUX window (900 -> 50), K=5 (README range 4-9)."""

    method: Literal["sortblock"] = "sortblock"
    start: float = Field(900.0, ge=0.0, le=1000.0, description="Window start: timestep (0-1000), or step fraction.")
    end: float = Field(50.0, ge=0.0, le=1000.0, description="Window end: timestep (0-1000), or step fraction.")
    window: Literal["timestep", "step_fraction"] = Field(
        "timestep",
        description="timestep: active while end <= t <= start (t on 0..1000); step_fraction: active while "
        "start <= step/steps <= end (0 = first step).",
    )
    K: int = Field(5, ge=1, le=100, description="Interval: every K-th call in the window runs all blocks. 1 = off.")
    beta: float = Field(0.3, ge=0.0, le=100.0, description="Scales rho_t, the fraction of blocks recomputed. 0-1 typical.")
    order: int = Field(1, ge=0, le=1, description="Residual prediction: 0 = reuse as is, 1 = linear in the step.")
    schedule: Literal["poly5", "constant"] = Field(
        "poly5", description="rho_t = beta * poly5(t) (authors) or rho_t = beta (constant)."
    )
    channel_fraction: float = Field(
        0.125, gt=0.0, le=1.0, description="Leading fraction of channels the similarity is measured on (authors: 1/8)."
    )

    @model_validator(mode="after")
    def _window_is_ordered(self) -> "SortblockConfig":
        if self.window == "timestep" and self.end > self.start:
            raise ValueError("with window=timestep, start (e.g. 900) must be >= end (e.g. 50): timesteps decrease")
        if self.window == "step_fraction" and not (0.0 <= self.start <= self.end <= 1.0):
            raise ValueError("with window=step_fraction, 0 <= start <= end <= 1")
        return self


def rho(config: SortblockConfig, timestep: float) -> float:
    """Fraction of blocks to recompute at this timestep (0..1000 scale), clipped to [0, 1]."""
    if config.schedule == "constant":
        value = config.beta
    else:
        value = 0.0
        for coefficient in RHO_POLY5:
            value = value * timestep + coefficient
        value *= config.beta
    return min(1.0, max(0.0, value))


def in_window(config: SortblockConfig, ctx: StepContext) -> bool:
    if config.window == "timestep":
        return config.end <= ctx.timestep <= config.start
    progress = ctx.step_index / max(1, ctx.num_steps)
    return config.start <= progress <= config.end


@dataclass
class SortblockCounters(Counters):
    predicted_blocks: int = 0  # block forwards replaced by a predicted residual
    rankings: int = 0
    rho: list[float] = field(default_factory=list)  # rho_t of each ranking


@dataclass
class _BlockCache:
    step: int
    residuals: tuple[torch.Tensor | None, ...]  # (image stream, text stream or None)
    slopes: tuple[torch.Tensor | None, ...] | None = None  # change per step, first order
    full_residuals: tuple[torch.Tensor | None, ...] | None = None  # residual of the last full step, for ranking


class SortblockState(BaseState):
    """Per CFG branch: the interval counter, the mode of the current call, block caches, marks, similarities."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls_in_window = 0
        self.mode: str = "plain"
        self.caches: dict[tuple[str, int], _BlockCache] = {}
        self.marks: dict[str, set[int]] | None = None  # None: every block (before the first ranking)
        self.similarity: dict[str, dict[int, float]] = {}

    def is_marked(self, stack: str, index: int) -> bool:
        return self.marks is None or index in self.marks.get(stack, set())


def _residuals(out: tuple, inp: tuple) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if o is None or i is None else o - i for o, i in zip(out, inp))


class SortblockBlockHook(ModelHook):
    """Runs or predicts one block according to the current call's mode and the block's mark."""

    def __init__(self, session: AccelSession, state: StateManager, config: SortblockConfig, stack: str, index: int,
                 counters: SortblockCounters):
        super().__init__()
        self.session, self.state_manager, self.config = session, state, config
        self.stack, self.index, self.counters = stack, index, counters

    def new_forward(self, module, *args, **kwargs):
        state: SortblockState = self.state_manager.get_state()
        io = self.session.block_io(module)
        if state.mode == "plain":
            return self.fn_ref.original_forward(*args, **kwargs)
        inputs = io.inputs(args, kwargs)
        step = self.session.current.step_index
        key = (self.stack, self.index)
        cache = state.caches.get(key)
        run = state.mode == "full" or cache is None or state.is_marked(self.stack, self.index)
        if run:
            output = self.fn_ref.original_forward(*args, **kwargs)
            used = _residuals(io.outputs(output), inputs)
            self._store(state, key, cache, step, used, full=state.mode == "full")
        else:
            used = self._predict(cache, step)
            output = io.make_output(*(None if i is None or r is None else i + r for i, r in zip(inputs, used)))
            self.counters.predicted_blocks += 1
        if state.mode == "rank" and cache is not None and cache.full_residuals is not None:
            state.similarity.setdefault(self.stack, {})[self.index] = self._similarity(cache.full_residuals[0], used[0])
        return output

    def _store(self, state, key, cache, step, residuals, *, full: bool) -> None:
        slopes = None
        if self.config.order >= 1 and cache is not None and step != cache.step:
            slopes = tuple(
                None if r is None or c is None else (r - c) / (step - cache.step)
                for r, c in zip(residuals, cache.residuals)
            )
        elif cache is not None:
            slopes = cache.slopes
        full_residuals = residuals if full else (cache.full_residuals if cache is not None else None)
        state.caches[key] = _BlockCache(step=step, residuals=residuals, slopes=slopes, full_residuals=full_residuals)

    def _predict(self, cache: _BlockCache, step: int) -> tuple[torch.Tensor | None, ...]:
        if self.config.order == 0 or cache.slopes is None:
            return cache.residuals
        delta = step - cache.step
        return tuple(None if r is None else r + delta * d for r, d in zip(cache.residuals, cache.slopes))

    @torch.compiler.disable
    def _similarity(self, full: torch.Tensor, used: torch.Tensor) -> float:
        channels = max(1, int(full.shape[-1] * self.config.channel_fraction))
        a, b = full[..., :channels].float(), used[..., :channels].float()
        if not a.any():  # a block that changes nothing (pruned for the call, made identity): never worth recomputing
            return float("inf")
        return float(F.cosine_similarity(a, b, dim=-1).mean())


class SortblockCallHook:
    """Call hook: sets the mode of each denoiser call and ranks the blocks after a rank call."""

    def __init__(self, state: StateManager, config: SortblockConfig, counters: SortblockCounters):
        self.state_manager, self.config, self.counters = state, config, counters

    def __call__(self, ctx: StepContext, call):
        state: SortblockState = self.state_manager.get_state()
        config = self.config
        if config.K == 1 or not in_window(config, ctx):
            state.mode = "plain"
        else:
            phase = state.calls_in_window % config.K
            state.mode = "full" if phase == 0 else "rank" if phase == 1 else "partial"
            state.calls_in_window += 1
        output = call()
        if state.mode == "rank":
            self._rank(state, ctx)
        return output

    def _rank(self, state: SortblockState, ctx: StepContext) -> None:
        rho_t = rho(self.config, ctx.timestep)
        marks: dict[str, set[int]] = {}
        for stack, sims in state.similarity.items():
            ordered = sorted(sims.values())
            threshold = ordered[min(int(len(ordered) * rho_t), len(ordered) - 1)]
            marks[stack] = {index for index, sim in sims.items() if sim <= threshold}
        state.marks = marks
        state.similarity = {}
        self.counters.rankings += 1
        self.counters.rho.append(round(rho_t, 4))


def apply_sortblock(session: AccelSession, config: SortblockConfig) -> MethodHandle:
    state = session.branch_state(SortblockState)
    counters = SortblockCounters()
    for stack, index, block in session.blocks():
        session.add_hook(block, SortblockBlockHook(session, state, config, stack, index, counters), SORTBLOCK_HOOK)
    session.add_call_hook(SortblockCallHook(state, config, counters))
    return MethodHandle(counters)


SORTBLOCK = Method(
    "sortblock", SortblockConfig, apply_sortblock,
    "Sortblock: similarity-ranked block residual reuse with linear prediction (arXiv 2508.00412)",
    exclusive="cache", batch_invariant=False,  # one ranking per batch
)
