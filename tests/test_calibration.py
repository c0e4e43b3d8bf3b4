"""Calibrated profiles, fidelity targets and the per-request fidelity estimate (accel/calibration)."""

import json

import numpy as np
import pytest
import torch

from accel import accelerate
from accel.calibration import calibrate as calibration
from accel.calibration.estimate import fit_estimator
from accel.calibration.profile import (
    Bucket,
    Fingerprint,
    NoProfileError,
    Profile,
    ProfileError,
    SettingStats,
    attach_profile,
    builtin_profile_path,
    fingerprint,
    load_profile,
    save_profile,
)
from accel.calibration.target import Target, choose_bucket, choose_setting, resolve_target
from accel.errors import SpecError
from accel.generate import GenerationParams, generate
from accel.loading import load_pipeline
from accel.spec import parse_spec


def setting(spec, work, psnr, speedup=None):
    values = list(psnr)
    return SettingStats(line=spec.split(":")[0], spec=spec, work=work, speedup=speedup or 1 / work, psnr=values,
                        psnr_median=float(np.median(values)), psnr_p10=float(np.percentile(values, 10)))


def bucket(**overrides):
    settings = [
        setting("abcache_adaptive:tolerance=0.3", 0.2, [30, 31, 32, 33, 34]),
        # a high median but one bad prompt: its p10 is low, so a target must not pick it
        setting("abcache:interval=6,order=2", 0.25, [22, 40, 41, 42, 43]),
        setting("abcache_adaptive:tolerance=0.1", 0.3, [36, 37, 38, 39, 40]),
        setting("sortblock:K=3,beta=0.1", 0.6, [45, 46, 47, 48, 49]),
    ]
    values = dict(height=128, width=128, steps=28, prompts=["a", "b", "c", "d", "e"], settings=settings,
                  front=[s.spec for s in settings])
    values.update(overrides)
    return Bucket(**values)


@pytest.fixture(scope="module")
def tiny(load):
    return load("tiny-flux")


# -- profiles: fingerprint, files ----------------------------------------------------------------------------
def test_shipped_profiles_load_and_match_their_model(tiny):
    assert tiny.accel_profile is not None, "load_pipeline attaches the shipped profile of a built-in model"
    profile = load_profile(builtin_profile_path("tiny-flux"))
    assert profile.fingerprint == fingerprint(tiny)
    assert profile.random_weights and "random" in profile.note


def test_profile_of_another_model_is_refused_with_a_clear_message(load, tmp_path):
    other = load("tiny-sd3")
    with pytest.raises(ProfileError, match=r"calibrated on another model \(tiny-flux\).*accel calibrate --model"):
        attach_profile(other, builtin_profile_path("tiny-flux"))
    # same class, other weights (another seed): the weights hash differs
    reseeded = load_pipeline("tiny-flux", seed=1)
    assert reseeded.__dict__.get("accel_profile") is None, "a shipped profile is never attached to other weights"
    with pytest.raises(ProfileError, match="weights"):
        attach_profile(reseeded, builtin_profile_path("tiny-flux"))
    with pytest.raises(ProfileError, match="calibrated on another model"):
        load_pipeline("tiny-flux", seed=1, profile=builtin_profile_path("tiny-flux"))


def test_fingerprint_is_the_same_in_bf16():
    pipe = load_pipeline("tiny-flux")
    assert fingerprint(load_pipeline("tiny-flux", dtype="bfloat16")) == fingerprint(pipe)


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2], "not valid JSON"),  # truncated
    (lambda text: "\x00\x01garbage", "not valid JSON"),
    (lambda text: json.dumps({"format": "something-else"}), "not an accel-profile/1 file"),
    (lambda text: text.replace('"psnr_p10"', '"psnr_p1O"', 1), "invalid"),
    (lambda text: text.replace('"work": 0.', '"work": -0.', 1), "invalid"),
    (lambda text: json.dumps({**json.loads(text), "buckets": []}), "invalid"),
])
def test_corrupt_or_truncated_profile_is_a_clear_error_at_load(tmp_path, damage, message):
    text = builtin_profile_path("tiny-flux").read_text()
    path = tmp_path / "broken.json"
    path.write_text(damage(text))
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)
    with pytest.raises(ProfileError):
        load_pipeline("tiny-flux", profile=path)  # at load, never in the middle of a request
    with pytest.raises(ProfileError, match="no such file"):
        load_profile(tmp_path / "missing.json")


def test_save_is_atomic_and_round_trips(tmp_path):
    profile = load_profile(builtin_profile_path("tiny-flux"))
    path = save_profile(profile, tmp_path / "p.json")
    assert load_profile(path) == profile
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"], "no temporary file left behind"


# -- target selection ----------------------------------------------------------------------------------------
def test_psnr_target_picks_the_least_work_whose_p10_meets_it():
    b = bucket()
    chosen, note = choose_setting(b, Target(psnr=35))
    assert chosen.spec == "abcache_adaptive:tolerance=0.1" and note is None  # not interval=6 (median 41, p10 29)
    chosen, _ = choose_setting(b, Target(psnr=29))
    assert chosen.spec == "abcache_adaptive:tolerance=0.3"
    chosen, _ = choose_setting(b, Target(psnr=42))
    assert chosen.spec == "sortblock:K=3,beta=0.1"


def test_unmeetable_targets_get_the_closest_setting_and_a_note():
    chosen, note = choose_setting(bucket(), Target(psnr=70))
    assert chosen.spec == "sortblock:K=3,beta=0.1" and "no calibrated setting reaches 70 dB" in note
    chosen, note = choose_setting(bucket(), Target(speedup=50))
    assert chosen.spec == "abcache_adaptive:tolerance=0.3" and "fastest" in note


def test_speedup_target_picks_the_most_faithful_setting_that_fast_enough():
    chosen, note = choose_setting(bucket(), Target(speedup=3.0))  # 0.2 -> 5x, 0.25 -> 4x, 0.3 -> 3.3x
    assert chosen.spec == "abcache_adaptive:tolerance=0.1" and note is None


def test_other_sizes_and_steps_fall_back_to_the_nearest_bucket_with_a_note():
    profile_buckets = [bucket(), bucket(height=256, width=256, steps=50)]
    profile = Profile(model="m", fingerprint=Fingerprint(weights="0" * 16, pipeline="P", transformer="T"),
                      buckets=profile_buckets)
    b, note = choose_bucket(profile, 128, 128, 28)
    assert b.height == 128 and note is None
    b, note = choose_bucket(profile, 512, 512, 50)
    assert b.height == 256 and "nearest calibrated bucket (256x256, 50 steps)" in note


def test_target_spec_is_validated():
    assert parse_spec({"target": {"psnr": 35}}).target == Target(psnr=35)
    assert parse_spec("target:speedup=2.5").key == "target:speedup=2.5"
    for bad, field in [({"target": {"psnr": 5}}, "target.psnr"), ({"target": {"speedup": 0.5}}, "target.speedup"),
                       ({"target": {"psnr": 30, "speedup": 2}}, "target"), ({"target": {}}, "target"),
                       (["target:psnr=30", "sortblock"], "target")]:
        with pytest.raises(SpecError) as info:
            parse_spec(bad)
        assert info.value.field == field


# -- targets on a pipeline -----------------------------------------------------------------------------------
def test_accelerate_resolves_a_target_on_the_profile_and_reports_it(tiny):
    params = GenerationParams.parse(prompt="a red circle on the left", seed=3)
    result = generate(tiny, params, {"target": {"psnr": 40}})
    target = result.report["target"]
    profile_bucket = tiny.accel_profile.buckets[0]
    meeting = [s for s in profile_bucket.settings if s.psnr_p10 >= 40]
    assert target["chosen"] == min(meeting, key=lambda s: (s.work, -s.psnr_p10, -s.speedup)).spec
    assert set(target["expected_psnr"]) == {"median", "p10"} and target["expected_psnr"]["p10"] >= 40
    assert target["expected_speedup"] > 0 and "random weights" in target["note"]
    assert result.report["methods"] == [parse_spec(target["chosen"]).key]
    # the library's context manager takes the same target (at the model's default size and steps)
    with accelerate(tiny, "target:psnr=40") as report:
        tiny("a red circle on the left", generator=torch.Generator().manual_seed(3))
    assert report.target["chosen"] == target["chosen"]
    # an unmeetable target: the closest setting and a note, no error
    far = generate(tiny, params, {"target": {"speedup": 90}}).report["target"]
    assert far["met"] is False and "no calibrated setting reaches a 90x speedup" in far["note"]
    other = generate(tiny, GenerationParams.parse(prompt="x", num_inference_steps=12), "target:psnr=30")
    assert "outside the calibrated range" in other.report["target"]["note"]


def test_target_without_profile_names_how_to_calibrate(load):
    pipe = load_pipeline("tiny-flux", seed=1)  # other weights: no profile fits
    with pytest.raises(NoProfileError, match="accel calibrate --model tiny-flux"):
        generate(pipe, GenerationParams.parse(prompt="x"), {"target": {"psnr": 35}})
    with pytest.raises(NoProfileError, match="calibrate: true"):
        resolve_target(pipe, Target(psnr=35))


def test_estimate_is_reported_and_leaves_outputs_unchanged(tiny):
    params = GenerationParams.parse(prompt="a red circle on the left", seed=5)
    spec = "abcache_adaptive:tolerance=0.2"
    observed = generate(tiny, params, spec)
    profile = tiny.__dict__.pop("accel_profile")
    try:
        plain_session = generate(tiny, params, spec)  # no profile: no observer at all
    finally:
        tiny.accel_profile = profile
    assert np.array_equal(observed.images, plain_session.images)
    estimate = observed.report["estimate"]
    assert estimate["method"] == "abcache_adaptive" and 10 < estimate["psnr"] <= 100
    assert "estimate" not in plain_session.report
    # a guarded target without a reason to act computes exactly the chosen setting
    guarded = generate(tiny, params, {"target": {"psnr": 20}})
    unguarded = generate(tiny, params, {"target": {"psnr": 20, "guard": False}})
    assert guarded.report["target"]["chosen"] == unguarded.report["target"]["chosen"]


def test_guard_tightens_adaptive_abcache_when_the_estimate_falls_short(tiny):
    """The guard's mechanism: an estimator that always predicts a PSNR below the target makes the session halve
    adaptive AB-Cache's tolerance at each computed step, so the call computes more steps than without the guard."""
    profile = tiny.accel_profile
    pessimist = profile.estimator.model_copy(update={"coefficients": {}, "default": [0.0, 0.0]})
    tiny.accel_profile = profile.model_copy(update={"estimator": pessimist})
    try:
        params = GenerationParams.parse(prompt="a red circle on the left", seed=2)
        guarded = generate(tiny, params, {"target": {"psnr": 20}})
        unguarded = generate(tiny, params, {"target": {"psnr": 20, "guard": False}})
    finally:
        tiny.accel_profile = profile
    assert guarded.report["target"]["chosen"].startswith("abcache_adaptive")
    guard = guarded.report["estimate"]["guard"]
    assert guard["tightened_at_step"] is not None and guard["tolerance_scale"] < 1 and guard["applies"]
    computed = lambda r: r.report["details"]["abcache_adaptive"]["computed_calls"]
    assert computed(guarded) > computed(unguarded)
    assert "guard" not in unguarded.report["estimate"]


def test_estimator_fit_recovers_a_linear_relation():
    errors = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    samples = [("abcache_adaptive", e, 20 - 8 * np.log10(e + 1e-6)) for e in errors] + [("abcache", 0.0, 100.0)]
    estimator = fit_estimator(samples)
    a, b = estimator.coefficients["abcache_adaptive"]
    assert b == pytest.approx(-8, abs=1e-6) and a == pytest.approx(20, abs=1e-4)
    assert estimator.mae_db["abcache_adaptive"] < 1e-6


# -- the sweep: resumable, Ctrl-C safe -----------------------------------------------------------------------
def test_calibration_is_resumable_and_interrupt_safe(tiny, tmp_path, monkeypatch):
    import accel.generate as generate_module

    out = tmp_path / "tiny.json"
    sweep = [("abcache_adaptive", "abcache_adaptive:tolerance=0.2"), ("abcache", "abcache:interval=3,order=2")]
    prompts = ["a red circle on the left", "a blue square at the top"]
    real, calls = generate_module.generate, []

    def interrupted(pipe, params, spec=None, **kwargs):
        calls.append(spec)
        if sum(s is not None for s in calls) == 3:  # the third accelerated run: Ctrl-C
            raise KeyboardInterrupt
        return real(pipe, params, spec, **kwargs)

    monkeypatch.setattr(generate_module, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibration.calibrate(tiny, out, model="tiny-flux", prompts=prompts, steps=6, sweep=sweep, progress=False)
    assert not out.exists(), "an interrupted calibration writes no profile"
    state = json.loads(calibration.state_path(out).read_text())
    assert sum(len(runs) for runs in state["runs"].values()) == 2
    calls.clear()
    monkeypatch.setattr(generate_module, "generate", lambda *a, **k: (calls.append(a[2]), real(*a, **k))[1])
    profile = calibration.calibrate(tiny, out, model="tiny-flux", prompts=prompts, steps=6, sweep=sweep,
                                    progress=False)
    assert sum(s is not None for s in calls) == 2, "the finished runs are not repeated"
    assert not calibration.state_path(out).exists() and load_profile(out) == profile
    b = profile.buckets[0]
    assert b.steps == 6 and b.prompts == prompts and {s.spec for s in b.settings} == {s for _, s in sweep}
    for s in b.settings:
        assert len(s.psnr) == 2 and 0 < s.work <= 1 and s.psnr_p10 <= s.psnr_median
    assert profile.fingerprint == fingerprint(tiny)
    # another calibration's state is not mixed in
    calibration.state_path(out).write_text(json.dumps({**state, "setup": {**state["setup"], "steps": 7}}))
    with pytest.raises(ProfileError, match="another calibration"):
        calibration.calibrate(tiny, out, model="tiny-flux", prompts=prompts, steps=6, sweep=sweep, progress=False)


def test_default_sweep_covers_every_cache_knob_the_family_supports(tiny, load):
    lines = {line for line, _ in calibration.default_sweep(tiny)}
    assert {"abcache_adaptive", "abcache", "sortblock", "taylorseer", "fbcache"} <= lines
    prompts = calibration.default_prompts("shapes-flux", 8)
    from accel.eval.shapes_captions import HELDOUT_TRIPLES, parse_caption

    assert len(set(prompts)) == 8 and not any(t in HELDOUT_TRIPLES for p in prompts for t in parse_caption(p))


# -- the shipped shapes-flux profile on held-out captions ----------------------------------------------------
HELDOUT_PROMPTS = 16


@pytest.mark.slow
@pytest.mark.parametrize("target", [30.0, 35.0, 40.0])
def test_shapes_flux_targets_hold_on_held_out_captions(target):
    """The setting chosen for each target meets it on >= 90% of held-out captions (none used in calibration);
    scripts/bench_targets.py heldout runs all 32 with and without the guard (docs/benchmarks.md)."""
    from pathlib import Path

    from accel.eval.metrics import psnr

    pipe = _shapes_flux()
    prompts = [line.strip() for line in (Path(__file__).parents[1] / "scripts/prompts/shapes-heldout.txt")
               .read_text().splitlines() if line.strip()][:HELDOUT_PROMPTS]
    assert not set(prompts) & set(pipe.accel_profile.buckets[0].prompts)
    met = []
    for prompt in prompts:
        params = GenerationParams.parse(prompt=prompt, seed=0)
        plain = _plain(pipe, prompt)
        result = generate(pipe, params, {"target": {"psnr": target, "guard": False}})
        met.append(psnr(plain, result.images) >= target)
    assert np.mean(met) >= 0.9, f"target {target} dB met on {sum(met)}/{len(met)} held-out captions"


_CACHE = {}


def _shapes_flux():
    if "pipe" not in _CACHE:
        _CACHE["pipe"] = load_pipeline("shapes-flux", builtin_loras=False)
        _CACHE["pipe"].set_progress_bar_config(disable=True)
    return _CACHE["pipe"]


def _plain(pipe, prompt):
    if prompt not in _CACHE:
        _CACHE[prompt] = generate(pipe, GenerationParams.parse(prompt=prompt, seed=0)).images
    return _CACHE[prompt]


def test_cli_calibrates_and_generates_with_a_target(tmp_path, capsys):
    from accel.cli import main

    out = tmp_path / "p.json"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    assert main(["calibrate", "--model", "tiny-flux", "--steps", "4", "--prompts", str(prompts),
                 "--only", "^abcache_adaptive$", "--out", str(out)]) == 0
    profile = load_profile(out)
    assert profile.buckets[0].steps == 4 and len(profile.buckets[0].settings) == 9
    assert profile.command.startswith("accel calibrate --model tiny-flux --prompts")
    capsys.readouterr()
    assert main(["generate", "--model", "tiny-flux", "--profile", str(out), "--prompt", "a red circle", "--steps",
                 "4", "--accel", "target:psnr=30", "--report", "--out", str(tmp_path / "x.png")]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["target"]["bucket"] == "128x128, 4 steps" and "outside" not in report["target"]["note"]


def test_a_lora_adapter_set_gets_its_own_profile_else_the_base_ones_with_a_note(tmp_path):
    """Issue 19: profiles per (model, adapter set), or the base model's with a note in the response."""
    from accel.cli import main

    out, prompts = tmp_path / "star.json", tmp_path / "prompts.txt"
    prompts.write_text("a red star on the left\n")
    assert main(["calibrate", "--model", "shapes-flux", "--steps", "4", "--prompts", str(prompts),
                 "--only", "^abcache_adaptive$", "--lora", "star=1", "--out", str(out)]) == 0
    profile = load_profile(out)
    assert [(ref.name, ref.scale) for ref in profile.lora] == [("star", 1.0)] and "--lora star=1" in profile.command
    pipe = load_pipeline("shapes-flux", profile=[out])
    assert pipe.accel_profile is not None and pipe.accel_profile.lora == [], "the shipped base profile stays"

    def target(lora):
        params = GenerationParams.parse(prompt="a red star on the left", seed=0, num_inference_steps=4, lora=lora)
        return generate(pipe, params, {"target": {"psnr": 30}}).report["target"]

    own = target([{"name": "star", "scale": 1.0}])
    assert own["bucket"] == "128x128, 4 steps" and "LoRA" not in (own["note"] or "")
    other = target([{"name": "star", "scale": 0.5}])
    assert "no profile calibrated with LoRA star=0.5" in other["note"] and other["bucket"] != own["bucket"]
    base = target([])
    assert base["bucket"] == other["bucket"] and "LoRA" not in (base["note"] or "")
    with pytest.raises(ProfileError, match="calibrated with LoRA adapter\\(s\\) star"):
        load_pipeline("shapes-flux", builtin_loras=False, profile=[out])
    data = json.loads(out.read_text())
    data["lora_weights"] = "0" * 32  # another version of the adapter
    out.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="other weights of LoRA adapter\\(s\\) star"):
        load_pipeline("shapes-flux", profile=[out])


def test_the_star_adapter_ships_its_own_profile():
    pipe = _shapes_flux()  # without its adapters: the star profile is not attached
    assert not getattr(pipe, "accel_lora_profiles", {})
    with_star = load_pipeline("shapes-flux")
    profile = with_star.accel_lora_profiles[(("star", 1.0),)]
    assert profile.buckets[0].steps == 28 and all("star" in p for p in profile.buckets[0].prompts)
    assert with_star.accel_profile.lora == []


def test_the_estimate_is_fitted_apart_for_reuse_and_for_the_corrector():
    """The same online error means less PSNR loss with AB-Cache's corrector, and more with plain reuse: fitted
    together, the corrected settings raised shapes-flux's calibration MAE for adaptive AB-Cache from 4.0 to 7.0 dB.
    `correct=auto` is keyed by what runs: corrected on an Euler scheduler, not on UniPC (Wan)."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from accel.calibration.estimate import estimate_key
    from accel.spec import parse_spec

    euler = SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler())
    unipc = SimpleNamespace(scheduler=UniPCMultistepScheduler())
    assert estimate_key(parse_spec("abcache_adaptive:tolerance=0.1"), euler) == "abcache_adaptive"
    assert estimate_key(parse_spec("abcache_adaptive:correct=true"), euler) == "abcache_adaptive corrected"
    assert estimate_key(parse_spec("balanced"), euler) == "abcache_adaptive corrected"  # correct=auto
    assert estimate_key(parse_spec("balanced"), unipc) == "abcache_adaptive"
    assert estimate_key(parse_spec("abcache:order=1,correct=true"), euler) == "abcache order 1"
    assert estimate_key(parse_spec("sortblock"), euler) == "sortblock"
