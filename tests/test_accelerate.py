"""The accelerator interface: bit-identity when nothing is skipped, no state leaks, exact work counts."""

import inspect

import numpy as np
import pytest

from accel import SpecError, accelerate
from accel.session import AccelSession
from accel.spec import parse_spec
from helpers import registries_empty, run

FAMILIES = ["tiny-flux", "tiny-wan", "tiny-sd3"]
# specs that must skip nothing and so be bit-identical to the plain pipeline
NO_SKIP_SPECS = {
    "tiny-flux": [[], "off", "fbcache:threshold=0", "taylorseer:disable_cache_before_step=1000",
                  "magcache:calibrate=true", "dbcache:Fn=1,threshold=0"],
    "tiny-wan": [[], "off", "fbcache:threshold=0", "taylorseer:disable_cache_before_step=1000",
                 "magcache:calibrate=true", "dbcache:Fn=1,threshold=0"],
    "tiny-sd3": [[], "off", "taylorseer:disable_cache_before_step=1000", "magcache:calibrate=true", "dbcache:Fn=1,threshold=0"],
}
# a spec that skips blocks on every family
SKIPPING = {"tiny-flux": "fbcache:threshold=1.0", "tiny-wan": "fbcache:threshold=1.0",
            "tiny-sd3": "magcache:mag_ratios=[1.0],threshold=1.0,retention_ratio=0"}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("batch", [1, 2])
def test_no_skip_specs_are_bit_identical_to_plain(load, name, cfg, batch):
    pipe = load(name)
    plain = run(pipe, name, cfg=cfg, batch=batch)
    pipe_class = type(pipe)
    for spec in NO_SKIP_SPECS[name]:
        with accelerate(pipe, spec) as report:
            out = run(pipe, name, cfg=cfg, batch=batch)
        assert np.array_equal(plain, out), f"{name} {spec!r} differs from plain diffusers"
        assert registries_empty(pipe.transformer)
        assert type(pipe) is pipe_class
        if spec:
            data = report.as_dict()
            assert data["block_fraction_computed"] == 1.0, (spec, data)


@pytest.mark.parametrize("name", FAMILIES)
def test_report_counts_steps_calls_and_blocks_exactly(load, name):
    pipe = load(name)
    steps = 4
    for cfg in (False, True):
        with accelerate(pipe, "taylorseer:disable_cache_before_step=1000") as report:
            run(pipe, name, cfg=cfg, num_inference_steps=steps)
        data = report.as_dict()
        separate_cfg = cfg and name != "tiny-sd3"  # SD3 batches uncond+cond into one call
        calls = steps * (2 if separate_cfg else 1)
        assert data["steps"] == steps
        assert data["transformer_calls"] == calls
        for stack, counts in data["blocks"].items():
            assert counts["total"] == calls * len(getattr(pipe.transformer, stack))
            assert counts["computed"] == counts["total"]


@pytest.mark.parametrize("name", FAMILIES)
def test_skipping_cache_reports_skipped_blocks_and_changes_output(load, name):
    pipe = load(name)
    plain = run(pipe, name, num_inference_steps=8)
    with accelerate(pipe, SKIPPING[name]) as report:
        out = run(pipe, name, num_inference_steps=8)
    data = report.as_dict()
    assert data["block_fraction_computed"] < 1.0
    assert any(c["skipped"] > 0 for c in data["blocks"].values())
    assert not np.array_equal(plain, out)
    assert registries_empty(pipe.transformer)


def test_diffusers_caches_work_on_pipelines_without_cache_context(load):
    """SD3 sets no cache context; diffusers' caches alone fail there, our session supplies one."""
    pipe = load("tiny-sd3")
    with accelerate(pipe, "taylorseer:cache_interval=2,disable_cache_before_step=1") as report:
        run(pipe, "tiny-sd3", cfg=True, num_inference_steps=6)
    data = report.as_dict()
    assert data["steps"] == 6
    # diffusers' schedule: step 0 (warm-up), then steps where (step - before - 1) % interval == 0: 2 and 4
    counts = data["details"]["taylorseer"]
    assert counts["module_forwards_computed"] * 6 == counts["module_forwards_total"] * 3


def test_fbcache_on_sd3_is_refused_with_the_supported_families(load):
    pipe = load("tiny-sd3")
    with pytest.raises(SpecError, match="fbcache: not available for the sd3 family; supported: flux, wan"):
        with accelerate(pipe, "fbcache"):
            pass


@pytest.mark.parametrize("name", FAMILIES)
def test_no_state_leaks_between_calls(load, name):
    pipe = load(name)
    spec_a, spec_b = SKIPPING[name], "taylorseer:cache_interval=2,disable_cache_before_step=1"
    with accelerate(pipe, spec_a):
        alone_a = run(pipe, name, cfg=True)
    with accelerate(pipe, spec_b):
        alone_b = run(pipe, name, cfg=True, seed=1)
    # in between: other specs, another step count and another size
    with accelerate(pipe, spec_b):
        run(pipe, name, num_inference_steps=6, height=96 if name != "tiny-wan" else 48, width=64 if name != "tiny-wan" else 48)
    with accelerate(pipe, spec_a):
        again_a = run(pipe, name, cfg=True)
    with accelerate(pipe, spec_b):
        again_b = run(pipe, name, cfg=True, seed=1)
    assert np.array_equal(alone_a, again_a)
    assert np.array_equal(alone_b, again_b)
    assert np.array_equal(run(pipe, name, cfg=True), run(pipe, name, cfg=True))


@pytest.mark.parametrize("name", FAMILIES)
def test_cache_dit_peer_skips_and_restores(load, name):
    pipe = load(name)
    children, forward = list(pipe.transformer._modules.items()), pipe.transformer.__dict__.get("forward")
    plain = run(pipe, name, cfg=True, num_inference_steps=10)
    with accelerate(pipe, "dbcache:Fn=1,threshold=0.5,warmup_steps=3") as report:
        out = run(pipe, name, cfg=True, num_inference_steps=10)
    # cache-dit reorders the transformer's children and replaces its forward; the session puts both back
    assert list(pipe.transformer._modules.items()) == children
    assert pipe.transformer.__dict__.get("forward") == forward
    assert report.block_fraction_computed < 1.0
    assert not np.array_equal(plain, out)
    assert np.array_equal(plain, run(pipe, name, cfg=True, num_inference_steps=10))


def test_cache_dit_knobs_checked_against_the_model(load):
    pipe = load("tiny-flux")
    plain = run(pipe, "tiny-flux")
    with pytest.raises(SpecError, match="dbcache.Fn: Fn \\+ Bn \\(8 \\+ 0\\) must be less than the 2 blocks"):
        with accelerate(pipe, "dbcache"):
            run(pipe, "tiny-flux")
    assert registries_empty(pipe.transformer)
    assert np.array_equal(plain, run(pipe, "tiny-flux"))


def test_hooks_removed_even_when_the_call_fails(load):
    pipe = load("tiny-flux")
    with pytest.raises(RuntimeError, match="boom"):
        with accelerate(pipe, "fbcache:threshold=0.2"):
            run(pipe, "tiny-flux")
            raise RuntimeError("boom")
    assert registries_empty(pipe.transformer)
    plain = run(pipe, "tiny-flux")
    with accelerate(pipe, []):
        assert np.array_equal(plain, run(pipe, "tiny-flux"))


def test_context_without_a_call_changes_nothing(load):
    pipe = load("tiny-flux")
    with accelerate(pipe, "fbcache") as report:
        pass
    assert report.as_dict()["transformer_calls"] == 0
    assert registries_empty(pipe.transformer)


def test_magcache_needs_ratios_outside_flux(load):
    pipe = load("tiny-wan")
    with pytest.raises(SpecError, match="mag_ratios"):
        with accelerate(pipe, "magcache"):
            run(pipe, "tiny-wan")
    assert registries_empty(pipe.transformer)
    flux = load("tiny-flux")
    with accelerate(flux, "magcache:calibrate=true") as report:
        run(flux, "tiny-flux")
    assert report.as_dict()["block_fraction_computed"] == 1.0


def test_unsupported_family_is_a_clear_error():
    class FakePipe:
        transformer = type("UNet2DConditionModel", (), {})()

    with pytest.raises(ValueError, match="supported families: flux"):
        with accelerate(FakePipe(), []):
            pass


def test_spec_forms_are_equivalent():
    forms = [
        "fbcache:threshold=0.1",
        {"method": "fbcache", "threshold": 0.1},
        '{"method": "fbcache", "threshold": 0.1}',
        '[{"method": "fbcache", "threshold": 0.1}]',
        ["fbcache:threshold=0.1"],
        parse_spec("fbcache:threshold=0.1")[0],
    ]
    parsed = [parse_spec(f) for f in forms]
    assert all(p == parsed[0] for p in parsed)
    assert parse_spec("off") == parse_spec(None) == parse_spec([]) == []
    from accel.presets import PRESETS

    for name, spec in PRESETS.items():
        assert parse_spec(name) == parse_spec(spec)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("nope", "unknown accelerator or preset 'nope'"),
        ({"method": "nope"}, "unknown accelerator method 'nope'"),
        ("fbcache:threshold=2", "fbcache.threshold"),
        ("fbcache:threshold=abc", "fbcache.threshold"),
        ("fbcache:bogus=1", "fbcache.bogus"),
        ("taylorseer:cache_interval=0", "taylorseer.cache_interval"),
        ("fbcache;taylorseer", "cannot be combined"),
        (["fbcache", "fbcache:threshold=0.2"], "given twice"),
        ("{not json", "not valid JSON"),
        ("fbcache:threshold", "expected key=value"),
        (42, "must be an object"),
    ],
)
def test_bad_specs_name_the_field(bad, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(bad)


def test_shorthand_round_trips():
    config = parse_spec("taylorseer:cache_interval=3,max_order=2")[0]
    assert config.shorthand() == "taylorseer:cache_interval=3,max_order=2"
    assert parse_spec(config.shorthand()) == [config]


@pytest.mark.parametrize("name", FAMILIES)
def test_session_records_the_running_call_with_its_defaults_and_restores_the_pipeline(load, name):
    """Methods read the call's arguments (e.g. the CFG scale) from `session.call_kwargs`, recorded at call entry;
    outside the call it is None, and the pipeline's class is its own again after the session."""
    pipe = load(name)
    pipe_class = type(pipe)
    session = AccelSession(pipe, [])
    seen = []
    session.attach()
    session.add_call_hook(lambda ctx, call: seen.append(dict(session.call_kwargs)) or call())
    try:
        assert type(pipe).__name__ == pipe_class.__name__ and isinstance(pipe, pipe_class)
        run(pipe, name, cfg=True, num_inference_steps=2)
    finally:
        session.detach()
    assert type(pipe) is pipe_class and session.call_kwargs is None
    assert seen and set(seen[0]) == set(inspect.signature(pipe_class.__call__).parameters) - {"self"}
    assert seen[0]["num_inference_steps"] == 2 and seen[0]["negative_prompt"] == "blurry"


def test_recorded_call_arguments_are_the_ones_the_pipeline_uses(load):
    """A knob the caller leaves out is recorded with the model's default (what the built-in's call uses), not
    diffusers' family default: S² reads its CFG scale from here."""
    pipe = load("tiny-wan")
    defaults = pipe.accel_defaults
    session = AccelSession(pipe, [])
    seen = []
    session.attach()
    session.add_call_hook(lambda ctx, call: seen.append(dict(session.call_kwargs)) or call())
    try:
        pipe("a ball", num_inference_steps=1, output_type="np")
    finally:
        session.detach()
    assert seen[0]["num_frames"] == defaults.num_frames and seen[0]["height"] == defaults.height
    if defaults.guidance_scale is not None:
        assert seen[0]["guidance_scale"] == defaults.guidance_scale


def test_counters_totals_add_numbers_join_lists_and_keep_the_latest_text():
    from dataclasses import dataclass, field

    from accel.base import Counters

    @dataclass
    class Example(Counters):
        calls: int = 0
        seconds: float = 0.0
        steps: list[int] = field(default_factory=list)
        names: list[str] = field(default_factory=list, metadata={"total": "union"})
        reason: str = ""

    total = Example(1, 0.5, [1], ["a"], "first")
    total.add(Example(2, 0.25, [2], ["a", "b"], ""))
    total.add(Example(0, 0.0, [], [], "latest"))
    assert total == Example(3, 0.75, [1, 2], ["a", "b"], "latest")
