"""Adaptive AB-Cache: AB-Cache's extrapolation of denoiser outputs (arXiv 2504.10540) with the refresh schedule
chosen by an embedded error estimate, as adaptive ODE solvers choose their step size (embedded Runge-Kutta pairs,
e.g. Dormand-Prince: two solutions of neighbouring orders from the same evaluations, their difference the local
error estimate, a step accepted while it is within the tolerance).

On every step that is not forced (warm-up, final steps, `max_skip` reached) the call hook extrapolates from the
cached outputs of the last computed steps twice: with `order` points (the prediction it returns, AB-Cache's Lagrange
form over the step index or sigma) and with a neighbouring order, its embedded partner:
- estimate="lower" (default): `order - 1` points. For order 2, |linear - constant| is the change the prediction
  adds since the last computed output (it grows linearly with the distance); conservative;
- estimate="higher": `order + 1` points (while the history is shorter, `order - 1`): |E_k - E_(k+1)| estimates the
  prediction's own truncation error (it grows with a higher power of the distance: longer skips, later refreshes).
Their relative difference, per batch item,

    err = mean |E_order - E_partner| / mean |E_order|,

is the local error estimate. The step is extrapolated when the largest item's err is at most `tolerance`, and
computed otherwise (its output is cached). The tolerance is therefore a fidelity knob in the units of the denoiser's
output, independent of a step count; 0 computes every step. Measured on shapes-flux (docs/benchmarks.md, "Caching
frontier"): "lower" beats "higher" at every fidelity (e.g. 19.0% of the work at 37.3 dB against 33.2 dB), order 2
beats orders 1 and 3, the step index beats sigma, and a 1-step warm-up with no forced final step beats AB-Cache's
5-step warm-up. Extrapolating the data prediction x0 = x_t - sigma v with the current x_t (DPM-Solver++ style) was
tried and not kept: equal or lower PSNR at equal work. `prediction="noise_blend"` (flow-matching families) extrapolates
as AB-Cache's knob of that name does (`accel.caching.abcache`); the error estimate compares the two blended outputs.

State is per CFG branch and per call, as AB-Cache's; the decision takes the batch's worst item, so an item's
schedule depends on its batch (`batch_invariant=False`), its prediction only on its own history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers.hooks.hooks import BaseState, StateManager
from pydantic import Field

from accel.adapters import unwrap_denoiser_output
from accel.base import Counters, Method, MethodHandle
from accel.caching.abcache import (
    PredictorKnobs, SkippedStep, corrects, extrapolate, predicted_output, settle_computed, skipped_step,
)
from accel.session import AccelSession, StepContext


class AdaptiveABCacheConfig(PredictorKnobs):
    """Knobs of adaptive AB-Cache. Defaults: measured on shapes-flux (docs/benchmarks.md, "Caching frontier")."""

    method: Literal["abcache_adaptive"] = "abcache_adaptive"
    tolerance: float = Field(
        0.1, ge=0.0, le=10.0,
        description="Largest relative error estimate at which a step is extrapolated (0 = compute every step). "
        "Default 0.1; 0.03-0.3 typical.",
    )
    order: int = Field(2, ge=1, le=3, description="Cached outputs the prediction extrapolates from (1 = reuse).")
    max_skip: int = Field(10, ge=0, le=1000, description="Most consecutive extrapolated steps per branch. Default 10.")
    warmup: int = Field(1, ge=1, le=1000, description="Leading steps always computed (at least 1). Default 1.")
    final: int = Field(0, ge=0, le=1000, description="Trailing steps always computed. Default 0.")
    estimate: Literal["lower", "higher"] = Field(
        "lower", description="Embedded partner of the prediction: order - 1 points (the change the last order adds; "
        "default, measured best) or order + 1 points (the prediction's own truncation error).",
    )
    spacing: Literal["steps", "sigmas"] = Field("steps", description="Extrapolation variable: step index or sigma.")


@dataclass
class AdaptiveABCacheCounters(Counters):
    computed_calls: int = 0  # denoiser calls run
    extrapolated_calls: int = 0  # denoiser calls replaced by an extrapolation
    computed_steps: list[int] = field(default_factory=list)  # step index of every computed call, in order


class AdaptiveABCacheState(BaseState):
    """Per CFG branch: the last cached values (newest last), their steps/times, and the run of skipped steps."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.times: list[float] = []
        self.values: list[torch.Tensor] = []  # cached values (`accel.caching.abcache.cached_value`)
        self.skipped = 0
        self.wrap: Any = None
        self.dtype: torch.dtype | None = None  # the denoiser output's dtype
        self.skipped_steps: list[SkippedStep] = []  # extrapolated steps since the last computed one (for `correct`)

    def push(self, time: float, value: torch.Tensor, keep: int) -> None:
        self.times.append(time)
        self.values.append(value)
        del self.times[:-keep], self.values[:-keep]


def relative_errors(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per batch item (first dimension): mean |value - reference| / mean |reference|."""
    diff = (value - reference).abs().flatten(1).mean(dim=1)
    return diff / reference.abs().flatten(1).mean(dim=1).clamp_min(1e-12)


def relative_error(prediction: torch.Tensor, partner: torch.Tensor) -> float:
    """The largest item's mean |prediction - partner| / mean |prediction| (batch = first dimension)."""
    return float(relative_errors(partner, prediction).max())


class AdaptiveABCacheCallHook:
    """Call hook: extrapolates when the embedded error estimate allows it, runs the denoiser otherwise."""

    def __init__(self, config: AdaptiveABCacheConfig, state: StateManager, counters: AdaptiveABCacheCounters,
                 scale=lambda: 1.0, correct: bool = False):
        self.config, self.state, self.counters, self.correct = config, state, counters, correct
        self.scale = scale  # the session's per-call tolerance_scale (a fidelity guard lowers it; 1.0 otherwise)

    def _time(self, ctx: StepContext) -> float:
        if self.config.spacing == "sigmas" and ctx.sigma is not None:
            return float(ctx.sigma)
        return float(ctx.step_index)

    def __call__(self, ctx: StepContext, call):
        history: AdaptiveABCacheState = self.state.get_state()
        num_steps = ctx.num_steps or (ctx.step_index + 1)
        forced = (self.config.tolerance == 0 or ctx.step_index < self.config.warmup
                  or ctx.step_index >= num_steps - self.config.final or history.skipped >= self.config.max_skip
                  or not history.values)
        if not forced:
            prediction = self.predict(history, ctx)
            if prediction is not None:
                history.skipped += 1
                self.counters.extrapolated_calls += 1
                if self.correct and (record := skipped_step(ctx, self._time(ctx), prediction,
                                                            self.config.prediction)) is not None:
                    history.skipped_steps.append(record)
                return history.wrap(prediction.to(history.dtype))
        output = call()
        sample, history.wrap = unwrap_denoiser_output(output)
        history.dtype = sample.dtype
        output, value = settle_computed(output, sample, ctx, self._time(ctx), history.times, history.values,
                                        history.skipped_steps, self.config.order, self.config.prediction, history.wrap)
        history.skipped_steps = []
        history.push(self._time(ctx), value, self.config.order + 1)
        history.skipped = 0
        self.counters.computed_calls += 1
        self.counters.computed_steps.append(ctx.step_index)
        return output

    def predict(self, history: AdaptiveABCacheState, ctx: StepContext) -> torch.Tensor | None:
        """The extrapolated output of this step (float32), or None when the error estimate exceeds the tolerance."""
        k = min(self.config.order, len(history.values))
        partner = k + 1 if self.config.estimate == "higher" and len(history.values) > k else k - 1
        if partner < 1:
            return None  # one cached value (or order 1 with "lower"): no estimate, so no skip
        t = self._time(ctx)
        blend = self.config.prediction
        prediction = predicted_output(extrapolate(history.times[-k:], history.values[-k:], t), ctx, blend)
        check = predicted_output(extrapolate(history.times[-partner:], history.values[-partner:], t), ctx, blend)
        if relative_error(prediction, check) > self.config.tolerance * self.scale():
            return None
        return prediction


def apply_abcache_adaptive(session: AccelSession, config: AdaptiveABCacheConfig) -> MethodHandle:
    counters = AdaptiveABCacheCounters()
    session.add_call_hook(AdaptiveABCacheCallHook(config, session.branch_state(AdaptiveABCacheState), counters,
                                                  lambda: getattr(session, "tolerance_scale", 1.0),
                                                  corrects(config, session.pipe)))
    return MethodHandle(counters)


ABCACHE_ADAPTIVE = Method(
    "abcache_adaptive", AdaptiveABCacheConfig, apply_abcache_adaptive,
    "Adaptive AB-Cache: extrapolated denoiser outputs, refreshed when an embedded error estimate exceeds a tolerance",
    exclusive="cache", batch_invariant=False,  # the refresh decision takes the batch's worst item
)
