"""AB-Cache (arXiv 2504.10540): Adams-Bashforth extrapolation of cached denoiser outputs.

The denoiser's output changes smoothly, nearly linearly, along the trajectory. On a skipped step no block runs;
the output is extrapolated from the outputs of the last `order` computed steps:
- spacing="binomial": the fixed backward-difference weights of the authors' update, sum_{j=1..k} (-1)^(j+1) C(k, j)
  f_{n-j} (k=2: 2 f0 - f1), over the last k *computed* outputs as if they were one step apart; every skipped step
  until the next refresh gets that same extrapolation. (Feeding each extrapolation back into the history, so that
  skipped steps advance along the trajectory, was measured on shapes-flux: 10.4 dB and no prompt adherence against
  36.2 dB for this form, as errors compound across refreshes; docs/benchmarks.md.) It is not the default;
- spacing="steps": Lagrange extrapolation over the step indices of the cached outputs to the current step;
- spacing="sigmas": Lagrange extrapolation over the scheduler's noise levels sigma of those steps to the current
  sigma: exact for outputs polynomial in sigma, and the natural variable on shifted FLUX/Wan schedules.
On uniformly spaced history all three give the same weights.

What is extrapolated (`prediction`): the output v itself ("velocity", the authors'), or, on flow-matching families
("noise_blend"), v and the noise prediction eps = x_t + (1 - sigma) v of each computed step, combined on a skipped
step with the current latents as sigma * v_hat + eps_hat - x_t: the velocity's extrapolation weighted by sigma, and
by 1 - sigma the velocity (eps_hat - x_t) / (1 - sigma) that the extrapolated noise implies at x_t. Early (sigma
near 1) it is the velocity form; late, the noise form, which keeps the current latents' deviations (at low noise the
model treats them as content) and whose eps changes slowly there. Measured on shapes-flux (docs/benchmarks.md,
"Caching frontier"); pure noise (or data x0 = x_t - sigma v) prediction was worse: eps_hat / (1 - sigma) amplifies the
extrapolation's error near sigma = 1, and x0 is not smooth early.

Correction (`correct`, an extension beyond the paper; FlowMatch Euler schedulers): Adams-Bashforth predicts a skipped
step from computed steps behind it; once the next step is computed, the outputs on both sides are known. On each
computed step the steps skipped since the last one are re-estimated by Lagrange interpolation through the cached
points and this step's output (order 2: linear between the computed steps around them), and this step's output gets
sum_j dsigma_j (interpolated_j - extrapolated_j) / dsigma: the Euler step moves the latents by dsigma * output, so
they land where the interpolated outputs would have put them (Adams-Moulton's use of the new point, applied after
the fact; no extra denoiser call). "auto" corrects where the scheduler is FlowMatch Euler and not elsewhere.

Refresh schedule (authors: warmup 5, interval 6 over 50 steps, i.e. 13 of 50 computed): a step i runs the
transformer if i < warmup, or i >= steps - final, or i % interval == 0; otherwise it is extrapolated. Or an explicit
list of computed steps (`steps=[0, 3, 8, ...]`): a schedule calibrated once per model and step count
(`accel.calibration.schedules`, MagCache-style), which follows where this model's outputs bend. Cached per
CFG branch (the combine is linear, so this equals caching after it); SD3-style batched CFG caches the batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from math import comb
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from diffusers.hooks.hooks import BaseState, StateManager

from accel.adapters import unwrap_denoiser_output
from accel.base import Counters, Method, MethodConfig, MethodHandle
from accel.session import AccelSession, StepContext


class PredictorKnobs(MethodConfig):
    """The predictor knobs both AB-Cache methods share (module docstring; docs/accelerators.md)."""

    prediction: Literal["velocity", "noise_blend"] = Field(
        "velocity", description="What is extrapolated: the denoiser's output, or (flow-matching families) also its "
        "noise prediction, blended with the current latents (sigma * v + eps - x_t)."
    )
    correct: bool | Literal["auto"] = Field(
        False, description="On each computed step, re-estimate the skipped steps since the last one by interpolation "
        "and move the latents by the difference (FlowMatch Euler schedulers; \"auto\": where the scheduler is one)."
    )

    @field_validator("correct", mode="before")
    @classmethod
    def _true_false_or_auto(cls, value: Any) -> Any:
        if isinstance(value, bool) or value == "auto":
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"should be true, false or \"auto\", got {value!r}")

    def unsupported(self, adapter: Any, pipe: Any) -> tuple[str, str] | None:
        if self.prediction == "noise_blend" and not adapter.flow_output:
            return "prediction", (f"'noise_blend' needs a flow-matching velocity output; the {adapter.family} "
                                  "family's is not (use 'velocity')")
        if self.correct is True and not euler_steps(getattr(pipe, "scheduler", None)):
            return "correct", (f"needs a scheduler whose step is latents + (sigma_next - sigma) * output "
                               f"(FlowMatchEulerDiscreteScheduler); this pipeline's is {type(pipe.scheduler).__name__}")
        return None


class ABCacheConfig(PredictorKnobs):
    """Knobs of AB-Cache. Defaults: the authors' schedule; spacing="steps", measured best on shapes-flux, bench-flux
    and tiny-wan (docs/benchmarks.md)."""

    method: Literal["abcache"] = "abcache"
    order: int = Field(2, ge=1, le=4, description="Number of cached outputs extrapolated from (1 = plain reuse).")
    warmup: int = Field(5, ge=0, le=1000, description="Leading steps always computed. Default 5.")
    interval: int = Field(6, ge=1, le=1000, description="Step i computes when i % interval == 0. 1 = off. Default 6.")
    final: int = Field(0, ge=0, le=1000, description="Trailing steps always computed. Default 0 (authors).")
    steps: list[int] | None = Field(
        None, max_length=1000, description="Compute exactly these step indices, increasing (a calibrated schedule); "
        "replaces warmup, interval and final. A branch's first call is always computed.",
    )
    spacing: Literal["sigmas", "steps", "binomial"] = Field(
        "steps", description="Extrapolation variable: scheduler sigmas (Lagrange), step indices, or the authors' "
        "fixed binomial weights."
    )

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[int] | None) -> list[int] | None:
        if steps is not None and (any(s < 0 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:]))):
            raise ValueError("steps must be increasing step indices >= 0")
        return steps


def binomial_weights(order: int) -> list[float]:
    """Weights of f_{n-1}, ..., f_{n-k} in the k-th order backward-difference extrapolation."""
    return [float((-1) ** (j + 1) * comb(order, j)) for j in range(1, order + 1)]


def lagrange_weights(points: list[float], target: float) -> list[float]:
    """Weights w_j with sum_j w_j f(points[j]) = p(target), p the polynomial through the points."""
    weights = []
    for j, xj in enumerate(points):
        w = 1.0
        for m, xm in enumerate(points):
            if m != j:
                w *= (target - xm) / (xj - xm)
        weights.append(w)
    return weights


def extrapolate(times: list[float], values: list[torch.Tensor], target: float) -> torch.Tensor:
    """Lagrange extrapolation (or interpolation) through (times, values) to `target`, in float32 (plain reuse of the
    newest value on repeated times)."""
    if len(set(times)) < len(times):
        return values[-1].float()
    result = torch.zeros_like(values[-1], dtype=torch.float32)
    for w, value in zip(lagrange_weights(times, target), values):
        result = result + w * value.float()
    return result


def corrects(config: Any, pipe: Any) -> bool:
    """Whether the correction runs: `correct=true`, or "auto" on a FlowMatch Euler scheduler."""
    return config.correct is True or (config.correct == "auto" and euler_steps(getattr(pipe, "scheduler", None)))


def euler_steps(scheduler: Any) -> bool:
    """Whether the scheduler moves the latents by (sigma_next - sigma) * output, deterministically."""
    return (type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
            and not getattr(scheduler, "config", {}).get("stochastic_sampling", False))


def _sigma(ctx: StepContext) -> float:
    return float(ctx.sigma) if ctx.sigma is not None else ctx.timestep / 1000.0


def _latents_like(ctx: StepContext, output: torch.Tensor) -> torch.Tensor:
    """x_t of the call, cut to the output's shape (conditioning concatenated after the latents dropped)."""
    return ctx.latents[tuple(slice(0, n) for n in output.shape)].float()


def cached_value(output: torch.Tensor, ctx: StepContext, prediction: str,
                 shift: torch.Tensor | None = None) -> torch.Tensor:
    """What is cached for a computed output: itself, or (noise_blend) [v, eps] stacked, in float32 (eps with the
    latents moved by `shift`, the correction this step applies)."""
    if prediction == "velocity":
        return output
    v = output.float()
    latents = _latents_like(ctx, v) if shift is None else _latents_like(ctx, v) + shift
    return torch.stack([v, latents + (1.0 - _sigma(ctx)) * v])


def predicted_output(value: torch.Tensor, ctx: StepContext, prediction: str) -> torch.Tensor:
    """The output for an extrapolated cached value: itself, or (noise_blend) sigma * v_hat + eps_hat - x_t."""
    if prediction == "velocity":
        return value
    return _sigma(ctx) * value[0] + value[1] - _latents_like(ctx, value[0])


@dataclass
class SkippedStep:
    """An extrapolated step, as the correction needs it once the next computed output is known."""

    time: float  # on the extrapolation's variable
    dsigma: float  # sigma_next - sigma: the latents moved by dsigma * output
    ctx: StepContext  # its sigma and latents (for the noise blend)
    returned: torch.Tensor  # the extrapolated output, float32


def skipped_step(ctx: StepContext, time: float, returned: torch.Tensor, prediction: str) -> SkippedStep | None:
    """The record of an extrapolated step, or None without the scheduler's plan (no sigmas: nothing to correct)."""
    if ctx.sigma is None or ctx.sigma_next is None:
        return None
    if prediction == "noise_blend":  # keep this step's latents (the pipeline may reuse the tensor)
        ctx = dataclasses.replace(ctx, latents=ctx.latents.clone())
    return SkippedStep(time, float(ctx.sigma_next) - float(ctx.sigma), ctx, returned.float())


def corrected(sample: torch.Tensor, ctx: StepContext, skipped: list[SkippedStep], times: list[float],
              values: list[torch.Tensor], prediction: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(this computed step's output with the correction, the latents' shift it makes): each skipped step since the
    last computed one is re-estimated by Lagrange interpolation through `times`/`values` (the cached points, this
    step's last), and the latents, which moved by dsigma * extrapolation there, are moved by the sum of dsigma *
    (interpolation - extrapolation) through this step's output (the scheduler moves them by its dsigma * output)."""
    if not skipped or ctx.sigma is None or ctx.sigma_next is None or ctx.sigma_next == ctx.sigma:
        return sample, None
    shift = torch.zeros_like(skipped[0].returned)
    for step in skipped:
        interpolated = predicted_output(extrapolate(times, values, step.time), step.ctx, prediction)
        shift = shift + step.dsigma * (interpolated - step.returned)
    return (sample.float() + shift / (float(ctx.sigma_next) - float(ctx.sigma))).to(sample.dtype), shift


def settle_computed(output: Any, sample: torch.Tensor, ctx: StepContext, time: float, times: list[float],
                    values: list[torch.Tensor], skipped: list[SkippedStep], order: int, prediction: str,
                    wrap: Any) -> tuple[Any, torch.Tensor]:
    """(the output to return, the value to cache) for a computed step of either AB-Cache method: the output as is,
    or, with skipped steps to correct, moved by their correction through `order` points (the last order - 1 cached
    ones and this step's), its noise prediction cached at the corrected latents."""
    value = cached_value(sample, ctx, prediction)
    if not skipped:
        return output, value
    first = max(0, len(values) - (order - 1))
    returned, shift = corrected(sample, ctx, skipped, times[first:] + [time], values[first:] + [value], prediction)
    if shift is None:
        return output, value
    return wrap(returned), cached_value(sample, ctx, prediction, shift)


def should_compute(config: ABCacheConfig, step: int, num_steps: int) -> bool:
    if config.steps is not None:
        return step in config.steps
    return step < config.warmup or step >= num_steps - config.final or step % config.interval == 0


@dataclass
class ABCacheCounters(Counters):
    computed_calls: int = 0  # denoiser calls run
    extrapolated_calls: int = 0  # denoiser calls replaced by an extrapolation


class ABCacheState(BaseState):
    """Per CFG branch: the outputs of the last `order` computed steps, newest last."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps: list[int] = []
        self.times: list[float] = []
        self.outputs: list[torch.Tensor] = []  # cached values (`cached_value`)
        self.wrap: Any = None  # rebuilds the transformer's return structure around a tensor
        self.dtype: torch.dtype | None = None  # the denoiser output's dtype
        self.skipped: list[SkippedStep] = []  # extrapolated steps since the last computed one (for `correct`)

    def push(self, step: int, time: float, output: torch.Tensor, keep: int) -> None:
        self.steps.append(step)
        self.times.append(time)
        self.outputs.append(output)
        del self.steps[:-keep], self.times[:-keep], self.outputs[:-keep]


class ABCacheCallHook:
    """Call hook: runs the denoiser on refresh steps, extrapolates its output on the others."""

    def __init__(self, config: ABCacheConfig, state: StateManager, counters: ABCacheCounters, correct: bool = False):
        self.config, self.state, self.counters, self.correct = config, state, counters, correct

    def _time(self, ctx: StepContext) -> float:
        if self.config.spacing == "sigmas" and ctx.sigma is not None:
            return float(ctx.sigma)
        return float(ctx.step_index)

    def __call__(self, ctx: StepContext, call):
        history: ABCacheState = self.state.get_state()
        num_steps = ctx.num_steps or (ctx.step_index + 1)
        blend = self.config.prediction
        if should_compute(self.config, ctx.step_index, num_steps) or not history.outputs:
            output = call()
            sample, history.wrap = unwrap_denoiser_output(output)
            history.dtype = sample.dtype
            output, value = settle_computed(output, sample, ctx, self._time(ctx), history.times, history.outputs,
                                            history.skipped, self.config.order, blend, history.wrap)
            history.skipped = []
            history.push(ctx.step_index, self._time(ctx), value, self.config.order)
            self.counters.computed_calls += 1
            return output
        self.counters.extrapolated_calls += 1
        prediction = predicted_output(self.extrapolate(history, ctx), ctx, blend)
        if self.correct and (record := skipped_step(ctx, self._time(ctx), prediction, blend)) is not None:
            history.skipped.append(record)
        return history.wrap(prediction.to(history.dtype))

    def extrapolate(self, history: ABCacheState, ctx: StepContext) -> torch.Tensor:
        if self.config.spacing != "binomial":  # Lagrange (plain reuse on repeated times: no sigma progress)
            return extrapolate(history.times, history.outputs, self._time(ctx))
        result = torch.zeros_like(history.outputs[0], dtype=torch.float32)
        for w, f in zip(binomial_weights(len(history.outputs)), reversed(history.outputs)):  # f_{n-1} first
            result = result + w * f.float()
        return result


def apply_abcache(session: AccelSession, config: ABCacheConfig) -> MethodHandle:
    counters = ABCacheCounters()
    session.add_call_hook(ABCacheCallHook(config, session.branch_state(ABCacheState), counters,
                                          corrects(config, session.pipe)))
    return MethodHandle(counters)


ABCACHE = Method(
    "abcache", ABCacheConfig, apply_abcache,
    "AB-Cache: Adams-Bashforth extrapolation of cached denoiser outputs (arXiv 2504.10540)",
    exclusive="cache",
)
