"""Adaptive AB-Cache (`abcache_adaptive`): bit-identity at skip-nothing knobs, exact work counts (counted outside the
method, on every attention's query projection), no state across calls, branches or batch items, knob validation,
and the embedded error estimate itself."""

import numpy as np
import pytest
import torch

from accel import SpecError, accelerate
from accel.caching.abcache_adaptive import (
    AdaptiveABCacheCallHook, AdaptiveABCacheConfig, AdaptiveABCacheCounters, AdaptiveABCacheState, extrapolate,
    relative_error,
)
from accel.spec import parse_spec
from helpers import registries_empty, run

FAMILIES = ["tiny-flux", "tiny-wan"]
SKIP_NOTHING = ["abcache_adaptive:tolerance=0", "abcache_adaptive:max_skip=0", "abcache_adaptive:warmup=1000"]
SKIPPING = "abcache_adaptive:tolerance=10"  # every step that has an estimate is extrapolated (up to max_skip)


class QueryCalls:
    """Attention computations counted outside the methods: a pre-hook on every `to_q` of the transformer."""

    def __init__(self, pipe):
        self.count = 0
        self.handles = [m.register_forward_pre_hook(self._hit) for n, m in pipe.transformer.named_modules()
                        if n.endswith("to_q")]
        self.per_call = len(self.handles)  # one query projection per attention, every attention runs once a call

    def _hit(self, *_):
        self.count += 1

    def close(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("batch", [1, 2])
def test_knobs_that_skip_nothing_are_bit_identical(load, name, cfg, batch):
    pipe = load(name)
    plain = run(pipe, name, cfg=cfg, batch=batch, num_inference_steps=8)
    for spec in SKIP_NOTHING:
        with accelerate(pipe, spec) as report:
            out = run(pipe, name, cfg=cfg, batch=batch, num_inference_steps=8)
        assert np.array_equal(plain, out), spec
        assert report.block_fraction_computed == 1.0, spec
        assert report.details["abcache_adaptive"].extrapolated_calls == 0, spec
        assert registries_empty(pipe.transformer)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("spec", [SKIPPING, "abcache_adaptive:tolerance=0.2,max_skip=2,order=3,estimate=higher"])
def test_work_counted_outside_equals_the_report(load, name, cfg, spec):
    pipe = load(name)
    counter = QueryCalls(pipe)
    try:
        with accelerate(pipe, spec) as report:
            run(pipe, name, cfg=cfg, num_inference_steps=10)
    finally:
        counter.close()
    details = report.details["abcache_adaptive"]
    blocks_per_call = sum(report.blocks_total.values()) // report.transformer_calls
    assert details.computed_calls + details.extrapolated_calls == report.transformer_calls
    assert len(details.computed_steps) == details.computed_calls
    assert sum(report.blocks_computed.values()) == details.computed_calls * blocks_per_call
    assert counter.count == details.computed_calls * counter.per_call  # skipped calls run no attention at all
    if spec == SKIPPING:
        assert details.extrapolated_calls > 0
        # per branch: steps 0 and 1 computed (no estimate from one output), then max_skip (10) steps extrapolated
        assert sorted(details.computed_steps) == sorted([0, 1] * (2 if cfg else 1))


def test_each_branch_keeps_its_own_history(load):
    """True CFG: the uncond branch computes its own first steps; it never extrapolates from the cond outputs."""
    pipe = load("tiny-flux")
    with accelerate(pipe, SKIPPING) as report:
        run(pipe, "tiny-flux", cfg=True, num_inference_steps=6)
    steps = report.details["abcache_adaptive"].computed_steps
    assert steps.count(0) == 2 and steps.count(1) == 2 and len(steps) == 4


@pytest.mark.parametrize("name", FAMILIES)
def test_no_state_leaks_between_calls_sizes_and_step_counts(load, name):
    spec = "abcache_adaptive:tolerance=0.3"
    pipe = load(name)
    with accelerate(pipe, spec):
        first = run(pipe, name, cfg=True, num_inference_steps=10)
        again_in_block = run(pipe, name, cfg=True, num_inference_steps=10)
    small = dict(height=48, width=48) if name == "tiny-wan" else dict(height=96, width=64)
    with accelerate(pipe, spec):
        run(pipe, name, num_inference_steps=7, **small)
    with accelerate(pipe, "abcache"):
        run(pipe, name, cfg=True, num_inference_steps=5)
    with accelerate(pipe, spec):
        again = run(pipe, name, cfg=True, num_inference_steps=10)
    assert np.array_equal(first, again) and np.array_equal(first, again_in_block)
    assert registries_empty(pipe.transformer)


def test_a_batch_item_equals_the_same_request_alone(load):
    """Two identical items (same prompt, same noise): the worst-item decision equals each item's own, and each item
    is extrapolated from its own history only, so the batch gives what one item alone gives."""
    pipe = load("tiny-flux")
    kwargs = dict(height=64, width=64, num_inference_steps=10, output_type="np")
    spec = "abcache_adaptive:tolerance=0.3"
    with accelerate(pipe, spec) as alone:
        single = pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    with accelerate(pipe, spec) as both:
        pair = pipe(prompt=["a red circle"] * 2, generator=[torch.Generator().manual_seed(0) for _ in range(2)],
                    **kwargs).images
    assert alone.details["abcache_adaptive"].computed_steps == both.details["abcache_adaptive"].computed_steps
    assert alone.details["abcache_adaptive"].extrapolated_calls > 0
    np.testing.assert_allclose(pair[0], single[0], atol=1e-4)
    np.testing.assert_allclose(pair[1], single[0], atol=1e-4)


def test_skipping_changes_the_output_a_little(load):
    pipe = load("tiny-wan")
    plain = run(pipe, "tiny-wan", cfg=True, num_inference_steps=12)
    with accelerate(pipe, "abcache_adaptive:tolerance=0.3") as report:
        out = run(pipe, "tiny-wan", cfg=True, num_inference_steps=12)
    assert report.block_fraction_computed < 0.9
    assert not np.array_equal(plain, out)
    assert np.abs(plain - out).mean() < 0.05


@pytest.mark.parametrize(
    "bad, field",
    [
        ("abcache_adaptive:tolerance=-0.1", "abcache_adaptive.tolerance"),
        ("abcache_adaptive:order=4", "abcache_adaptive.order"),
        ("abcache_adaptive:order=0", "abcache_adaptive.order"),
        ("abcache_adaptive:warmup=0", "abcache_adaptive.warmup"),
        ("abcache_adaptive:max_skip=-1", "abcache_adaptive.max_skip"),
        ("abcache_adaptive:final=-1", "abcache_adaptive.final"),
        ("abcache_adaptive:estimate=middle", "abcache_adaptive.estimate"),
        ("abcache_adaptive:spacing=cubic", "abcache_adaptive.spacing"),
        ("abcache_adaptive:interval=3", "abcache_adaptive.interval"),
        ("abcache_adaptive:correct=maybe", "abcache_adaptive.correct"),
        ("abcache:correct=1", "abcache.correct"),
        ("abcache:prediction=noise", "abcache.prediction"),
    ],
)
def test_bad_knobs_name_the_field(bad, field):
    with pytest.raises(SpecError) as info:
        parse_spec(bad)
    assert info.value.field == field and field in str(info.value)


def test_it_is_a_cache_like_the_others():
    for spec in ["abcache_adaptive;abcache", "abcache_adaptive;sortblock", "taylorseer;abcache_adaptive"]:
        with pytest.raises(SpecError, match="cannot be combined"):
            parse_spec(spec)
    assert parse_spec("abcache_adaptive").key == "abcache_adaptive"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_extrapolation_is_exact_for_polynomials_of_degree_k_minus_one(k):
    coefficients = torch.randn(k, 3, dtype=torch.float64)
    poly = lambda t: sum(c * t ** i for i, c in enumerate(coefficients))
    times = [0.0, 2.0, 5.0][:k]
    value = extrapolate(times, [poly(t).float() for t in times], 9.0)
    torch.testing.assert_close(value.double(), poly(9.0), rtol=1e-4, atol=1e-3)


def test_relative_error_takes_the_worst_item():
    a = torch.ones(2, 4)
    b = torch.stack([torch.full((4,), 1.1), torch.full((4,), 1.5)])
    assert relative_error(a, b) == pytest.approx(0.5)


def _drive(config, outputs):
    """Run the call hook over synthetic denoiser outputs; returns (returned values, counters)."""
    state, counters = AdaptiveABCacheState(), AdaptiveABCacheCounters()
    hook = AdaptiveABCacheCallHook(config, type("M", (), {"get_state": lambda self: state})(), counters)
    returned = []
    for step, value in enumerate(outputs):
        ctx = type("Ctx", (), {"step_index": step, "num_steps": len(outputs), "sigma": None})()
        returned.append(hook(ctx, lambda v=value: v.clone()))
    return returned, counters


def test_embedded_estimate_skips_where_the_prediction_is_exact():
    """Linear outputs: order 2 against order 3 ("higher") differ by 0, so every step after the first three is
    extrapolated (max_skip apart), exactly; with a tiny tolerance a curved trajectory computes every step."""
    linear = [torch.full((1, 3), 1.0 + 0.5 * s) for s in range(12)]
    returned, counters = _drive(AdaptiveABCacheConfig(tolerance=1e-6, estimate="higher", max_skip=4), linear)
    assert counters.computed_steps == [0, 1, 2, 7]  # 2: partner "lower" (linear vs constant) differs; then exact
    for value, expected in zip(returned, linear):
        torch.testing.assert_close(value, expected)
    curved = [torch.full((1, 3), 1.0 + 0.5 * s * s) for s in range(12)]
    _, counters = _drive(AdaptiveABCacheConfig(tolerance=1e-6, estimate="higher"), curved)
    assert counters.extrapolated_calls == 0


def test_lower_estimate_is_the_change_since_the_last_computed_output():
    """estimate=lower, order 2: err = |linear - constant| / |linear| = the relative change predicted since the last
    computed step; a tolerance between two steps' changes separates them."""
    values = [torch.full((1, 2), 1.0), torch.full((1, 2), 1.1)] + [torch.full((1, 2), 9.0)] * 4
    _, counters = _drive(AdaptiveABCacheConfig(tolerance=0.1, max_skip=10), values)
    # step 2: linear 1.2 vs constant 1.1 -> 0.083 <= 0.1: extrapolated; step 3: 1.3 vs 1.1 -> 0.154: computed
    assert counters.computed_steps[:3] == [0, 1, 3]


# -- calibrated AB-Cache schedules (`abcache:steps=[...]`, accel.calibration.schedules) ------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
def test_an_explicit_schedule_computes_exactly_its_steps(load, name, cfg):
    pipe = load(name)
    plain = run(pipe, name, cfg=cfg, num_inference_steps=8)
    with accelerate(pipe, "abcache:steps=[0,1,2,3,4,5,6,7]") as report:
        out = run(pipe, name, cfg=cfg, num_inference_steps=8)
    assert np.array_equal(plain, out) and report.block_fraction_computed == 1.0
    counter = QueryCalls(pipe)
    try:
        with accelerate(pipe, "abcache:steps=[0,2,5]") as report:
            run(pipe, name, cfg=cfg, num_inference_steps=8)
    finally:
        counter.close()
    branches = report.transformer_calls // 8
    assert report.details["abcache"].computed_calls == 3 * branches
    assert counter.count == 3 * branches * counter.per_call
    assert report.details["abcache"].extrapolated_calls == 5 * branches


def test_a_schedule_must_be_increasing_step_indices():
    for bad in ("abcache:steps=[3,1]", "abcache:steps=[0,0,2]", "abcache:steps=[-1,2]"):
        with pytest.raises(SpecError, match="abcache.steps"):
            parse_spec(bad)


def test_schedule_search_climbs_to_the_best_schedule():
    """Coordinate ascent from evenly spaced steps reaches the optimum of a separable score; step 0 stays first."""
    from accel.calibration.schedules import evenly_spaced, schedule_spec, search_schedule

    target = [0, 2, 7, 20]
    calls = []

    def score(schedule):
        calls.append(schedule)
        return -float(sum((a - b) ** 2 for a, b in zip(schedule, target)))

    assert evenly_spaced(4, 28) == [0, 7, 14, 21]
    best, value = search_schedule(score, 4, 28)
    assert best == target and value == 0.0
    assert all(s[0] == 0 and s == sorted(set(s)) and s[-1] < 28 for s in calls)
    assert schedule_spec(best) == "abcache:order=2,steps=[0,2,7,20]"


def test_schedule_search_grows_the_previous_budgets_schedule():
    """A budget starts from the previous budget's schedule plus its best added step when that scores higher than
    evenly spaced steps: budgets are searched in increasing order and seed one another."""
    from accel.calibration.schedules import search_schedule

    target = [0, 1, 2, 27]

    def score(schedule):  # flat everywhere else: coordinate ascent from evenly spaced steps cannot climb
        return 0.0 if schedule == target else -1.0

    assert search_schedule(score, 4, 28) == ([0, 7, 14, 21], -1.0)
    assert search_schedule(score, 4, 28, previous=[0, 1, 2]) == (target, 0.0)


# -- AB-Cache's noise blend (`prediction=noise_blend`) ---------------------------------------------------------------
def _blend_ctx(step, sigma, latents):
    from accel.session import StepContext

    return StepContext(step_index=step, branch="cond", timestep=1000.0 * sigma, sigma=sigma, num_steps=8,
                       latents=latents)


def test_noise_blend_is_exact_on_a_straight_flow_and_keeps_a_deviation_of_the_latents():
    """On a straight path x_t = (1 - sigma) x0 + sigma eps (velocity eps - x0 at every step) the blend predicts the
    velocity exactly from two computed steps, at any later sigma; latents that deviate by d from that path give
    v - d (the noise prediction holds: the deviation is kept as content), where the velocity form would give v.
    Catches a wrong sign or weight in sigma * v + eps - x_t, or a conditioning slice taken for x_t."""
    from accel.caching.abcache import cached_value, lagrange_weights, predicted_output

    torch.manual_seed(0)
    x0, eps = torch.randn(1, 4, 3), torch.randn(1, 4, 3)
    v = eps - x0
    cond = torch.randn(1, 4, 2)  # conditioning channels concatenated after the latents (Wan I2V-style)
    sigmas = [1.0, 0.8, 0.5]
    cached = [cached_value(v, _blend_ctx(i, s, torch.cat([(1 - s) * x0 + s * eps, cond], dim=-1)), "noise_blend")
              for i, s in enumerate(sigmas[:2])]
    w = lagrange_weights([0.0, 1.0], 2.0)
    value = w[0] * cached[0] + w[1] * cached[1]
    x_t = (1 - sigmas[2]) * x0 + sigmas[2] * eps
    torch.testing.assert_close(predicted_output(value, _blend_ctx(2, sigmas[2], torch.cat([x_t, cond], -1)),
                                                "noise_blend"), v)
    d = 0.1 * torch.randn_like(x_t)
    torch.testing.assert_close(predicted_output(value, _blend_ctx(2, sigmas[2], torch.cat([x_t + d, cond], -1)),
                                                "noise_blend"), v - d)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan", "tiny-sd3"])
def test_noise_blend_schedule_is_exact_at_full_schedule_and_counts_its_steps(load, name):
    """FLUX packed tokens, Wan video latents with CFG, SD3's batched CFG (the conformance matrix runs the blend on
    every flow-matching variant, I2V's concatenated conditions included)."""
    pipe = load(name)
    cfg = name != "tiny-flux"
    plain = run(pipe, name, cfg=cfg, num_inference_steps=8)
    with accelerate(pipe, "abcache:steps=[0,1,2,3,4,5,6,7],prediction=noise_blend"):
        assert np.array_equal(plain, run(pipe, name, cfg=cfg, num_inference_steps=8))
    with accelerate(pipe, "abcache:steps=[0,2,5],prediction=noise_blend") as report:
        out = run(pipe, name, cfg=cfg, num_inference_steps=8)
    assert np.isfinite(out).all() and not np.array_equal(plain, out)
    assert report.details["abcache"].extrapolated_calls == report.transformer_calls - report.details["abcache"].computed_calls > 0


REFUSED = [("prediction=noise_blend", name, "prediction: 'noise_blend' needs a flow-matching velocity")
           for name in ("tiny-pixart", "tiny-zimage", "tiny-cogvideox", "tiny-ltx")]
REFUSED += [("correct=true", name, "correct: needs a scheduler whose step is latents")
            for name in ("tiny-wan", "tiny-pixart", "tiny-cogvideox")]


@pytest.mark.parametrize("knob,name,message", REFUSED, ids=[f"{k}-{n}" for k, n, _ in REFUSED])
@pytest.mark.parametrize("method", ["abcache", "abcache_adaptive"])
def test_a_predictor_knob_the_pipeline_cannot_run_is_refused_by_name(load, knob, name, message, method):
    """noise_blend where the output is not a flow velocity, correct=true where the scheduler is not Euler; the
    method itself runs there."""
    pipe = load(name)
    with pytest.raises(SpecError, match=f"{method}.{message}"):
        with accelerate(pipe, f"{method}:{knob}"):
            pass
    with accelerate(pipe, method):
        pass


# -- AB-Cache's correction (`correct=true`) ------------------------------------------------------------------------
def _euler_with_hook(hook, velocity, sigmas):
    """A fake Euler loop x += (sigma_next - sigma) * output over a denoiser whose output is velocity(step)."""
    from accel.session import StepContext

    x = torch.zeros(1, 3)
    for step in range(len(sigmas) - 1):
        ctx = StepContext(step_index=step, branch="cond", timestep=1000.0 * sigmas[step], sigma=sigmas[step],
                          num_steps=len(sigmas) - 1, latents=x, sigma_next=sigmas[step + 1])
        x = x + (sigmas[step + 1] - sigmas[step]) * hook(ctx, lambda s=step: velocity(s).clone())
    return x


@pytest.mark.parametrize("adaptive", [False, True], ids=["schedule", "adaptive"])
def test_correction_moves_the_latents_as_if_the_skipped_steps_had_the_interpolated_outputs(adaptive):
    """After a computed step the latents are exactly where they would be had each skipped step since the last
    computed one returned the interpolation between the computed outputs around it (order 2: linear in the step
    index), not the extrapolation; skipped steps after the last computed one keep theirs. Catches a correction with
    the wrong sign, the wrong step's dsigma, a segment that is not reset, or points from the wrong side."""
    from accel.caching.abcache import ABCacheCallHook, ABCacheConfig, ABCacheCounters, ABCacheState

    def velocity(step):  # quadratic in the step index: order-2 extrapolation and interpolation both err
        return torch.tensor([[1.0, -2.0, 0.5]]) * (1.0 + 0.3 * step + 0.05 * step * step)

    sigmas = [1.0, 0.93, 0.85, 0.76, 0.66, 0.55, 0.43, 0.3, 0.16, 0.0]
    computed = [0, 1, 4, 7]
    if adaptive:
        state, counters = AdaptiveABCacheState(), AdaptiveABCacheCounters()
        config = AdaptiveABCacheConfig(tolerance=10.0, max_skip=2, correct=True)  # computes 0, 1, 4, 7
        hook = AdaptiveABCacheCallHook(config, type("M", (), {"get_state": lambda self: state})(), counters,
                                       correct=True)
    else:
        state, counters = ABCacheState(), ABCacheCounters()
        hook = ABCacheCallHook(ABCacheConfig(steps=computed, correct=True),
                               type("M", (), {"get_state": lambda self: state})(), counters, correct=True)
    x = _euler_with_hook(hook, velocity, sigmas)
    if adaptive:
        assert counters.computed_steps == computed
    expected = torch.zeros(1, 3)
    for step in range(len(sigmas) - 1):
        if step in computed:
            v = velocity(step)
        else:
            a = max(c for c in computed if c < step)
            later = [c for c in computed if c > step]
            if later:  # interpolated between the computed steps around it
                b = later[0]
                v = velocity(a) + (step - a) / (b - a) * (velocity(b) - velocity(a))
            else:  # after the last computed step: the order-2 extrapolation
                p = max(c for c in computed if c < a)
                v = velocity(a) + (step - a) / (a - p) * (velocity(a) - velocity(p))
        expected = expected + (sigmas[step + 1] - sigmas[step]) * v
    torch.testing.assert_close(x, expected)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
@pytest.mark.parametrize("spec", ["abcache:steps=[0,2,5],correct=true",
                                  "abcache:steps=[0,2,5],correct=true,prediction=noise_blend",
                                  "abcache_adaptive:tolerance=10,max_skip=2,correct=true"])
def test_correction_is_exact_without_skips_and_counts_the_same_work(load, name, spec):
    pipe = load(name)
    plain = run(pipe, name, cfg=True, num_inference_steps=8)
    everything = spec.replace("steps=[0,2,5]", "steps=[0,1,2,3,4,5,6,7]").replace("tolerance=10", "tolerance=0")
    with accelerate(pipe, everything):
        assert np.array_equal(plain, run(pipe, name, cfg=True, num_inference_steps=8))
    method = spec.split(":")[0]
    uncorrected = spec.replace(",correct=true", "")
    reports = []
    for s in (spec, uncorrected):
        with accelerate(pipe, s) as report:
            reports.append((run(pipe, name, cfg=True, num_inference_steps=8), report))
    (out, report), (out_plain_form, report_plain_form) = reports
    assert report.details[method].computed_calls == report_plain_form.details[method].computed_calls
    assert np.isfinite(out).all() and not np.array_equal(out, out_plain_form)


@pytest.mark.parametrize("method", ["abcache", "abcache_adaptive"])
def test_correct_auto_runs_uncorrected_where_the_scheduler_is_not_euler(load, method):
    pipe = load("tiny-wan")
    skipping = {"abcache": "abcache:warmup=1,interval=3", "abcache_adaptive": SKIPPING}[method]
    outputs = []
    for correct in ("auto", "false"):
        with accelerate(pipe, f"{skipping},correct={correct}"):
            outputs.append(run(pipe, "tiny-wan", cfg=True, num_inference_steps=8))
    assert np.array_equal(*outputs)


def test_correct_auto_corrects_on_euler_schedulers(load):
    pipe = load("tiny-flux")
    outputs = {}
    for correct in ("auto", "true", "false"):
        with accelerate(pipe, f"abcache:warmup=1,interval=3,correct={correct}"):
            outputs[correct] = run(pipe, "tiny-flux", num_inference_steps=8)
    assert np.array_equal(outputs["auto"], outputs["true"]) and not np.array_equal(outputs["auto"], outputs["false"])


def test_correction_raises_fidelity_on_the_trained_model(load, one_thread):
    """Measured bound on shapes-flux (28 steps, the 6 held-out captions of scripts/bench_frontier.py): the 7-step
    calibrated schedule's PSNR against the plain output rises by 4.5 dB on average with the correction (+0.5 to
    +8 dB per caption, none lower); the bound leaves room for the machine's float differences."""
    import sys
    from pathlib import Path

    from accel.eval.metrics import psnr
    from accel.generate import GenerationParams, generate

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_frontier import held_out_captions

    pipe = load("shapes-flux")
    gains = []
    for prompt in held_out_captions(6):
        def image(spec):
            return generate(pipe, GenerationParams.parse(prompt=prompt, seed=0, num_inference_steps=28), spec).images

        plain = image(None)
        schedule = "abcache:steps=[0,2,5,8,12,18,24]"
        gains.append(psnr(plain, image(schedule + ",correct=true")) - psnr(plain, image(schedule)))
    assert np.mean(gains) > 3.0 and min(gains) > -0.5, gains


def test_correction_without_sigmas_corrects_nothing():
    """Without the scheduler's sigmas (a transformer called with no plan) nothing is corrected, and nothing fails."""
    from accel.caching.abcache import ABCacheCallHook, ABCacheConfig, ABCacheCounters, ABCacheState
    from accel.session import StepContext

    outputs = {}
    for correct in (True, False):
        state = ABCacheState()
        hook = ABCacheCallHook(ABCacheConfig(steps=[0, 1, 4]), type("M", (), {"get_state": lambda self: state})(),
                               ABCacheCounters(), correct=correct)
        outputs[correct] = [hook(StepContext(step_index=i, branch="cond", timestep=float(i), sigma=None, num_steps=6),
                                 lambda i=i: torch.full((1, 2), float(i * i))) for i in range(6)]
    for a, b in zip(outputs[True], outputs[False]):
        assert torch.equal(a, b)
