"""A per-request fidelity estimate from what the call already sees, and a guard that acts on it.

Every cache computes some steps it could have predicted (AB-Cache at its refresh steps, Sortblock and the block
caches at their full steps). There the difference between the prediction and the computed output is free to
measure. The observer (`ErrorObserver`, a call hook outside every method, one state per CFG branch) keeps the last
two fully computed denoiser outputs of each branch and, at each fully computed step s after a gap of g steps
(g - 1 of them extrapolated or computed in part), measures per batch item

    err = mean |L(s) - out(s)| / mean |out(s)|,     L = the linear extrapolation from the last two computed outputs

(AB-Cache's order-2 prediction, the same one for `abcache` and `abcache_adaptive`; the plain reuse of an order-1
cache, whose error grows linearly, is measured as reuse and fitted apart). A call is fully computed when it runs as
many attention computations (`to_q`) as the branch's most, so caches that skip inside blocks count too. The
predictions the cache made at distances d = 1 .. g-1 were off by about err (d/g)^2 (a linear extrapolation's error
grows with the square of the distance), and a velocity error moves the latent by that times the step's sigma decrement, so the call's
accumulated error is

    E = sum over gaps of err * sum_{d=1..g-1} (d/g)^2 * dsigma(d)

plus the unobserved tail after the last computed step (the last gap's error carried on), the largest branch per
item. At calibration the final PSNR of every run is regressed on log10(E + 1e-6), per method (two coefficients
each, least squares; `Estimator` in the profile). At run time the estimate is reported per request
(`report["estimate"]`) and, when the request asked for a PSNR target with the guard on, checked at every computed
step on E projected to the end of the trajectory (E over the fraction of sigma covered so far, at least 0.3):
once the projected estimate is below the target, the session's `tolerance_scale` halves (adaptive AB-Cache reads
it: its tolerance shrinks, so it refreshes sooner), and halves again at each later computed step that is still
below. Other methods have no schedule the guard can tighten; their estimate is reported all the same.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from diffusers.hooks.hooks import BaseState

from accel.adapters import unwrap_denoiser_output
from accel.caching.abcache_adaptive import relative_errors
from accel.calibration.profile import Estimator

EPS = 1e-6
MIN_PROGRESS = 0.3  # the projection divides by the sigma progress so far, never by less than this
GUARD_FACTOR = 0.5  # tolerance_scale multiplier each time the projected estimate is below the target
GUARDED_METHODS = ("abcache_adaptive",)  # methods that read the session's tolerance_scale

_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("accel_estimate_recording", default=None)


@contextlib.contextmanager
def recording() -> Iterator[list[dict]]:
    """Inside the block every accelerated call is observed (also without a profile) and its observation appended
    to the yielded list: what calibration fits the estimator on."""
    records: list[dict] = []
    token = _RECORDING.set(records)
    try:
        yield records
    finally:
        _RECORDING.reset(token)


def primary_method(spec: Any) -> str | None:
    """The method an estimate is fitted per: the spec's cache, else its first method (a spec whose cache reuses
    its last output, `order=1`, is fitted apart: "<method> order 1")."""
    from accel.methods import METHODS

    names = [config.method for config in spec]
    caches = [name for name in names if METHODS[name].exclusive == "cache"]
    return (caches or names or [None])[0]


REUSE_ORDER = {"abcache": 1, "abcache_adaptive": 1, "sortblock": 0}  # the `order` at which a method reuses as is


def estimate_key(spec: Any, pipe: Any) -> str | None:
    """The key of the estimator's fit for a spec on `pipe`: its primary method, "<method> order 1" when it reuses its
    last output as is (AB-Cache order 1, Sortblock order 0), whose error grows linearly with the distance; "<method>
    corrected" when AB-Cache's corrector runs on this pipeline (`correct` true, or auto on an Euler scheduler), which
    makes the same online error cost less PSNR."""
    from accel.caching.abcache import corrects

    method = primary_method(spec)
    config = spec.method(method) if method else None
    reuse = method in REUSE_ORDER and getattr(config, "order", None) == REUSE_ORDER[method]
    if reuse:
        return f"{method} order 1"
    return f"{method} corrected" if hasattr(config, "correct") and corrects(config, pipe) else method


class ObserverState(BaseState):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []
        self.full = 0  # most blocks one call of this branch computed (a full step)
        self.error: torch.Tensor | None = None  # accumulated E per batch item
        self.last_err: torch.Tensor | None = None
        self.last_gap = 1
        self.observations = 0


@dataclass
class Observation:
    """What one call's observer saw: E per item, the estimate per item, what the guard did."""

    method: str | None
    error: list[float] = field(default_factory=list)
    estimate: list[float] | None = None
    observations: int = 0
    guard_target: float | None = None
    tightened_at: int | None = None
    tolerance_scale: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"method": self.method, "error": [round(e, 8) for e in self.error],
                                "observed_steps": self.observations}
        if self.estimate is not None:
            data["psnr"] = round(min(self.estimate), 2) if self.estimate else None
            data["per_item_psnr"] = [round(v, 2) for v in self.estimate]
        if self.guard_target is not None:
            data["guard"] = {"target_psnr": self.guard_target, "tightened_at_step": self.tightened_at,
                             "tolerance_scale": self.tolerance_scale,
                             "applies": self.method in GUARDED_METHODS}
        return data


class ErrorObserver:
    """The call hook (outermost: registered after the methods) that measures the online errors; see the module."""

    def __init__(self, session: Any, method: str | None, estimator: Estimator | None, guard_psnr: float | None,
                 order: int = 2):
        self.session, self.method, self.estimator = session, method, estimator
        self.order = order  # 1: the method reuses its last output (error grows linearly), 2: extrapolates linearly
        self.guard_psnr = guard_psnr if estimator is not None else None
        self.state = session.branch_state(ObserverState)
        self.states: list[ObserverState] = []
        self.result = Observation(method=method, guard_target=self.guard_psnr)
        # what a call computed: attention query projections run (a cache that skips inside blocks, like TaylorSeer,
        # skips these too), else the session's block count
        self.attentions = 0
        self.failed: str | None = None
        self.handles = [module.register_forward_pre_hook(self._attention)
                        for transformer in session.transformers.values()
                        for name, module in transformer.named_modules() if name.split(".")[-1] == "to_q"]
        session.add_call_hook(self)

    def _attention(self, *_: Any) -> None:
        self.attentions += 1

    def _work(self) -> int:
        return self.attentions if self.handles else sum(self.session.report.blocks_computed.values())

    def _dsigma(self, step: int) -> float:
        plan = self.session.plan
        if plan is not None and plan.sigmas is not None and step + 1 < len(plan.sigmas):
            return abs(plan.sigmas[step] - plan.sigmas[step + 1])
        steps = plan.num_steps if plan is not None and plan.num_steps else 1
        return 1.0 / steps

    def _progress(self, step: int) -> float:
        plan = self.session.plan
        if plan is not None and plan.sigmas is not None and len(plan.sigmas) > step + 1:
            start, end = plan.sigmas[0], plan.sigmas[-1]
            return (start - plan.sigmas[step + 1]) / (start - end) if start != end else 1.0
        steps = plan.num_steps if plan is not None and plan.num_steps else step + 1
        return (step + 1) / steps

    def _share(self, start: int, gap: int, count: int) -> float:
        """sum over d = 1..count of (d/gap)^order * dsigma(start + d): the extrapolated steps' share of an error
        observed at distance `gap`."""
        return sum((d / gap) ** self.order * self._dsigma(start + d) for d in range(1, count + 1))

    def __call__(self, ctx: Any, call: Any) -> Any:
        before = self._work()
        output = call()
        if self.failed:  # (checked after the call: the output is never the observer's business)
            return output
        try:
            self._observe(ctx, output, self._work() - before)
        except Exception as exc:  # noqa: BLE001 - an estimate never fails a request: this call reports none
            self.failed = f"{type(exc).__name__}: {exc}"
        return output

    def _observe(self, ctx: Any, output: Any, computed: int) -> None:
        state: ObserverState = self.state.get_state()
        if state not in self.states:
            self.states.append(state)
        state.full = max(state.full, computed)
        if computed == 0 or computed < state.full:
            return  # predicted (in whole or in part): judged at the next full step
        sample = unwrap_denoiser_output(output)[0].detach().float()
        step = ctx.step_index
        if state.steps and step <= state.steps[-1]:
            return
        if len(state.values) >= 2:
            t0, t1 = state.steps[-2:]
            v0, v1 = state.values[-2:]
            prediction = v1 if self.order == 1 else v1 + (v1 - v0) * ((step - t1) / (t1 - t0))
            err = relative_errors(prediction, sample)
            gap = step - t1
            share = self._share(t1, gap, gap - 1)
            state.error = err * share if state.error is None else state.error + err * share
            state.last_err, state.last_gap = err, gap
            state.observations += 1
            self.result.observations += 1
            self._guard(step)
        elif state.error is None:
            state.error = torch.zeros(sample.shape[0])
        state.steps = (state.steps + [step])[-2:]
        state.values = (state.values + [sample])[-2:]

    def _accumulated(self, tail: bool) -> torch.Tensor | None:
        errors = []
        num_steps = self.session.plan.num_steps if self.session.plan is not None else 0
        for state in self.states:
            if state.error is None:
                continue
            error = state.error.clone()
            if tail and state.steps and state.last_err is not None and num_steps:
                remaining = num_steps - 1 - state.steps[-1]  # steps after the last full one: never checked
                if remaining > 0:
                    error = error + state.last_err * self._share(state.steps[-1], state.last_gap, remaining)
            errors.append(error)
        if not errors:
            return None
        if len({e.numel() for e in errors}) > 1:  # branches of other batch sizes (a batched CFG pass): the worst
            return torch.stack([e.max() for e in errors]).max().reshape(1)
        return torch.stack(errors).max(dim=0).values

    def _guard(self, step: int) -> None:
        if self.guard_psnr is None or self.method not in GUARDED_METHODS:
            return
        error = self._accumulated(tail=False)
        if error is None:
            return
        projected = float(error.max()) / max(self._progress(step), MIN_PROGRESS)
        if self.estimator.predict(self.method, projected) < self.guard_psnr:
            self.session.tolerance_scale *= GUARD_FACTOR
            self.result.tolerance_scale = self.session.tolerance_scale
            if self.result.tightened_at is None:
                self.result.tightened_at = step

    def finish(self, report: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.failed:
            report.estimate = {"method": self.method, "psnr": None, "unavailable": self.failed}
            return
        try:
            error = self._accumulated(tail=True)
            self.result.error = [] if error is None else [float(e) for e in error]
            if self.estimator is not None and error is not None:
                self.result.estimate = [100.0 if e == 0 else self.estimator.predict(self.method, e)
                                        for e in self.result.error]
        except Exception as exc:  # noqa: BLE001 - as in __call__
            report.estimate = {"method": self.method, "psnr": None, "unavailable": f"{type(exc).__name__}: {exc}"}
            return
        report.estimate = self.result.as_dict()
        records = _RECORDING.get()
        if records is not None:
            records.append(self.result.as_dict())


def observers_for(pipe: Any, spec: Any, guard_psnr: float | None = None) -> list:
    """The observer factories `accelerate` gives the session: one when the spec accelerates and either the model's
    profile has an estimator or calibration is recording."""
    if not len(spec):
        return []
    from accel.calibration.profile import profile_of

    profile = profile_of(pipe)
    estimator = profile.estimator if profile is not None else None
    if estimator is None and _RECORDING.get() is None:
        return []
    key = estimate_key(spec, pipe)
    order = 1 if key and key.endswith(" order 1") else 2  # AB-Cache order 1: plain reuse
    return [lambda session: ErrorObserver(session, key, estimator, guard_psnr, order)]


# -- fitting -------------------------------------------------------------------------------------------------
def fit_estimator(samples: list[tuple[str | None, float, float]], min_samples: int = 4) -> Estimator:
    """Least squares PSNR = a + b log10(E + 1e-6) per method (methods with fewer than `min_samples` usable runs
    use the fit over all runs). Runs that skipped nothing (E = 0, PSNR 100) are left out: they are exact."""
    usable = [(m, e, p) for m, e, p in samples if e > 0 and p < 99 and math.isfinite(p)]
    if len(usable) < 2:
        return Estimator(default=[100.0, 0.0], samples=len(usable))

    def fit(rows):
        x = np.array([math.log10(e + EPS) for _, e, _ in rows])
        y = np.array([p for _, _, p in rows])
        if np.ptp(x) < 1e-9:
            return [float(y.mean()), 0.0]
        b, a = np.polyfit(x, y, 1)
        return [float(a), float(b)]

    default = fit(usable)
    coefficients, mae = {}, {}
    for method in sorted({m for m, _, _ in usable if m}):
        rows = [r for r in usable if r[0] == method]
        if len(rows) >= min_samples:
            coefficients[method] = fit(rows)
    estimator = Estimator(coefficients=coefficients, default=default, samples=len(usable))
    for method in sorted({m for m, _, _ in usable if m}):
        rows = [r for r in usable if r[0] == method]
        mae[method] = round(float(np.mean([abs(estimator.predict(m, e) - p) for m, e, p in rows])), 3)
    estimator.mae_db = mae
    return estimator
