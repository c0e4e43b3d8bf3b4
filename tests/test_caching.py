"""Sortblock and AB-Cache: bit-identity when nothing is skipped, exact work counts, exact predictors, no leaks."""

from math import comb

import numpy as np
import pytest
import torch

from accel import SpecError, accelerate
from accel.caching.abcache import (
    ABCacheCallHook, ABCacheConfig, ABCacheCounters, ABCacheState, binomial_weights, lagrange_weights,
)
from accel.caching.sortblock import SortblockBlockHook, SortblockConfig, SortblockCounters
from accel.spec import parse_spec
from helpers import registries_empty, run

FAMILIES = ["tiny-flux", "tiny-wan", "tiny-sd3"]
STACKS = {"tiny-flux": ("transformer_blocks", "single_transformer_blocks"), "tiny-wan": ("blocks",),
          "tiny-sd3": ("transformer_blocks",)}
POLY5 = (5.67621e-14, -1.36659e-10, 1.16246e-7, -3.97725e-5, 0.00361, 0.56088)


class AttentionCalls:
    """Counts executed blocks independently of the accelerators: a native pre-hook on each block's attention."""

    def __init__(self, pipe, name):
        self.count = 0
        self.handles = []
        for stack in STACKS[name]:
            for block in getattr(pipe.transformer, stack):
                attn = getattr(block, "attn", None) or block.attn1
                self.handles.append(attn.register_forward_pre_hook(self._hit))

    def _hit(self, *_):
        self.count += 1

    def close(self):
        for h in self.handles:
            h.remove()


def branches(name, cfg):
    return 2 if cfg and name != "tiny-sd3" else 1


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("batch", [1, 2])
def test_knobs_that_skip_nothing_are_bit_identical(load, name, cfg, batch):
    pipe = load(name)
    plain = run(pipe, name, cfg=cfg, batch=batch, num_inference_steps=8)
    for spec in ["sortblock:K=1", "sortblock:beta=100", "sortblock:schedule=constant,beta=1",
                 "abcache:interval=1", "abcache:warmup=8"]:
        with accelerate(pipe, spec) as report:
            out = run(pipe, name, cfg=cfg, batch=batch, num_inference_steps=8)
        assert np.array_equal(plain, out), spec
        assert report.block_fraction_computed == 1.0, spec
        assert registries_empty(pipe.transformer)


def expected_sortblock_blocks(pipe, name, config: SortblockConfig, n_branches: int) -> int:
    """Block forwards the Sortblock schedule implies, derived here from the scheduler's timesteps."""
    sizes = [len(getattr(pipe.transformer, s)) for s in STACKS[name]]
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    total = 0
    for _ in range(n_branches):
        calls, marks = 0, None
        for t in timesteps:
            if not (config.end <= t <= config.start) or config.K == 1:
                total += sum(sizes)
                continue
            phase = calls % config.K
            calls += 1
            if phase == 0:
                total += sum(sizes)
            elif phase == 1:
                total += sum(sizes) if marks is None else sum(marks)
                poly = 0.0
                for c in POLY5:
                    poly = poly * t + c
                rho_t = min(1.0, max(0.0, config.beta * poly))
                marks = [min(int(n * rho_t), n - 1) + 1 for n in sizes]
            else:
                total += sum(marks)
    return total


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("spec", ["sortblock:K=3,beta=0.5", "sortblock:K=4,beta=0.2,start=950,end=100"])
def test_sortblock_executes_exactly_the_scheduled_blocks(load, name, cfg, spec):
    pipe = load(name)
    config = parse_spec(spec)[0]
    counter = AttentionCalls(pipe, name)
    try:
        with accelerate(pipe, config) as report:
            run(pipe, name, cfg=cfg, num_inference_steps=12)
    finally:
        counter.close()
    expected = expected_sortblock_blocks(pipe, name, config, branches(name, cfg))
    assert counter.count == expected
    assert sum(report.blocks_computed.values()) == expected
    assert expected < sum(report.blocks_total.values())


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
def test_abcache_executes_exactly_the_scheduled_steps(load, name, cfg):
    pipe = load(name)
    steps, config = 20, ABCacheConfig(warmup=3, interval=4, final=2)
    computed_steps = [i for i in range(steps) if i < 3 or i >= steps - 2 or i % 4 == 0]
    assert len(computed_steps) == 9
    counter = AttentionCalls(pipe, name)
    try:
        with accelerate(pipe, config) as report:
            run(pipe, name, cfg=cfg, num_inference_steps=steps)
    finally:
        counter.close()
    n_blocks = sum(len(getattr(pipe.transformer, s)) for s in STACKS[name])
    assert counter.count == len(computed_steps) * n_blocks * branches(name, cfg)
    details = report.as_dict()["details"]["abcache"]
    assert details["computed_calls"] == len(computed_steps) * branches(name, cfg)
    assert details["extrapolated_calls"] == (steps - len(computed_steps)) * branches(name, cfg)


def test_linear_prediction_is_exact_on_linear_residuals():
    hook = SortblockBlockHook(None, None, SortblockConfig(order=1), "s", 0, SortblockCounters())
    a, b = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    from accel.caching.sortblock import SortblockState

    state = SortblockState()
    hook._store(state, ("s", 0), None, 2, (a + 2 * b, None), full=True)
    hook._store(state, ("s", 0), state.caches[("s", 0)], 5, (a + 5 * b, None), full=True)
    for step in (6, 7, 11):
        predicted = hook._predict(state.caches[("s", 0)], step)[0]
        torch.testing.assert_close(predicted, a + step * b, rtol=1e-12, atol=1e-12)
    zero = SortblockBlockHook(None, None, SortblockConfig(order=0), "s", 0, SortblockCounters())
    assert torch.equal(zero._predict(state.caches[("s", 0)], 9)[0], a + 5 * b)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_binomial_weights_are_the_backward_differences(order):
    assert binomial_weights(order) == [(-1) ** (j + 1) * comb(order, j) for j in range(1, order + 1)]
    assert binomial_weights(2) == [2.0, -1.0]
    # exact for polynomials of degree order-1 on a unit grid, newest first
    coeffs = np.random.default_rng(order).normal(size=order)
    f = lambda x: np.polyval(coeffs, x)  # noqa: E731
    history = [f(10 - j) for j in range(1, order + 1)]
    assert np.isclose(sum(w * v for w, v in zip(binomial_weights(order), history)), f(10))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ab_extrapolation_is_exact_for_polynomials_of_degree_order_minus_one(order):
    rng = np.random.default_rng(order)
    coeffs = torch.tensor(rng.normal(size=(order, 3, 4)))
    poly = lambda x: sum(c * x ** (order - 1 - p) for p, c in enumerate(coeffs))  # noqa: E731
    sigmas = [1.0, 0.93, 0.81, 0.66, 0.5]  # shifted, non-uniform: Lagrange over sigma must still be exact
    history = ABCacheState()
    for step, sigma in enumerate(sigmas[:order]):
        history.push(step, sigma, poly(sigma).float(), keep=order)
    call = ABCacheCallHook(ABCacheConfig(order=order, spacing="sigmas"), None, ABCacheCounters())
    ctx = type("Ctx", (), {"sigma": 0.4, "step_index": 7})()
    torch.testing.assert_close(call.extrapolate(history, ctx).double(), poly(0.4), rtol=1e-4, atol=1e-4)
    weights = lagrange_weights([float(x) for x in range(1, order + 1)], order + 1.0)  # unit grid: == binomial
    assert np.allclose(list(reversed(weights)), binomial_weights(order))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("spec", ["sortblock:K=3,beta=0.3", "abcache:warmup=2,interval=3"])
def test_no_state_leaks_between_calls_sizes_and_step_counts(load, name, spec):
    pipe = load(name)
    with accelerate(pipe, spec):
        first = run(pipe, name, cfg=True, num_inference_steps=10)
    small = dict(height=48, width=48) if name == "tiny-wan" else dict(height=96, width=64)
    with accelerate(pipe, spec):
        run(pipe, name, num_inference_steps=7, **small)
    with accelerate(pipe, "sortblock:K=2" if spec.startswith("abcache") else "abcache"):
        run(pipe, name, cfg=True, num_inference_steps=5)
    with accelerate(pipe, spec):
        again = run(pipe, name, cfg=True, num_inference_steps=10)
    assert np.array_equal(first, again)
    assert registries_empty(pipe.transformer)


@pytest.mark.parametrize("spec", ["abcache:warmup=2,interval=3"])
def test_no_leaks_between_batch_items(load, spec):
    """AB-Cache decisions do not depend on data, so a batch item equals the same request alone. (Sortblock ranks
    blocks once for the whole batch, since a block runs for all items: its decisions are shared by design.)"""
    pipe = load("tiny-flux")
    with accelerate(pipe, spec):
        out = pipe(prompt=["a red circle", "a red circle"], generator=torch.Generator().manual_seed(0),
                   height=64, width=64, num_inference_steps=10, output_type="np").images
    with accelerate(pipe, spec):
        single = pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0),
                      height=64, width=64, num_inference_steps=10, output_type="np").images
    # item 0 of the batch has the same noise as the single call; item 1 has other noise, so must differ
    np.testing.assert_allclose(out[0], single[0], atol=1e-4)
    assert not np.allclose(out[0], out[1])


def test_two_caches_that_skip_blocks_are_refused():
    for spec in ["sortblock;abcache", "sortblock;fbcache", "abcache;taylorseer", ["magcache", "sortblock"]]:
        with pytest.raises(SpecError, match="cannot be combined"):
            parse_spec(spec)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("sortblock:K=0", "sortblock.K"),
        ("sortblock:start=50,end=900", "start .* must be >= end"),
        ("sortblock:window=step_fraction,start=0.9,end=0.1", "0 <= start <= end <= 1"),
        ("sortblock:order=2", "sortblock.order"),
        ("sortblock:channel_fraction=0", "sortblock.channel_fraction"),
        ("abcache:order=5", "abcache.order"),
        ("abcache:spacing=cubic", "abcache.spacing"),
        ("abcache:interval=0", "abcache.interval"),
    ],
)
def test_bad_knobs_name_the_field(bad, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(bad)


def test_step_fraction_window(load):
    pipe = load("tiny-flux")
    with accelerate(pipe, "sortblock:window=step_fraction,start=0.25,end=0.75,K=2,beta=0.1") as report:
        run(pipe, "tiny-flux", num_inference_steps=12)
    assert 0 < report.block_fraction_computed < 1


def test_report_and_skipping_change_output(load):
    pipe = load("tiny-wan")
    plain = run(pipe, "tiny-wan", cfg=True, num_inference_steps=12)
    for spec in ["sortblock:K=3,beta=0.2", "abcache:warmup=2,interval=3"]:
        with accelerate(pipe, spec) as report:
            out = run(pipe, "tiny-wan", cfg=True, num_inference_steps=12)
        assert report.block_fraction_computed < 0.8
        assert not np.array_equal(plain, out)
        assert np.abs(plain - out).mean() < 0.05  # close to the plain output, not garbage


def test_binomial_spacing_uses_the_computed_outputs_only():
    """`spacing=binomial` is the authors' fixed weights over the last computed outputs: consecutive skipped steps
    get the same extrapolation (documented; feeding extrapolations back compounds errors, see abcache.py), while
    `spacing=steps` moves along the step index."""
    outputs = {}
    for spacing in ("binomial", "steps"):
        config = ABCacheConfig(order=2, warmup=2, interval=4, spacing=spacing)
        state, counters = ABCacheState(), ABCacheCounters()
        hook = ABCacheCallHook(config, type("M", (), {"get_state": lambda self: state})(), counters)
        outputs[spacing] = []
        for step in range(4):  # computed 0, 1; skipped 2, 3
            ctx = type("Ctx", (), {"step_index": step, "num_steps": 8, "sigma": None})()
            outputs[spacing].append(hook(ctx, lambda s=step: torch.full((2,), float(s))).tolist())
        assert counters.computed_calls == 2 and counters.extrapolated_calls == 2
    assert outputs["binomial"][2:] == [[2.0, 2.0], [2.0, 2.0]]
    assert outputs["steps"][2:] == [[2.0, 2.0], [3.0, 3.0]]


def test_sortblock_never_ranks_a_block_that_changes_nothing():
    """A block pruned for the call (identity: zero residual) must not take a recompute slot from a real block."""
    hook = SortblockBlockHook(None, None, SortblockConfig(), "s", 0, SortblockCounters())
    zero, other = torch.zeros(1, 4, 16), torch.randn(1, 4, 16)
    assert hook._similarity(zero, zero) == float("inf")
    assert hook._similarity(other, other) == pytest.approx(1.0)
