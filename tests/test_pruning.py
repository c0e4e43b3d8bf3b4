"""Block pruning: per-call skipping, calibration, plan checks, physical removal at load and its round trip."""

import json

import numpy as np
import pytest

from accel import SpecError, accelerate
from accel.cli import main
from accel.errors import AccelError
from accel.loading import load_pipeline
from accel.pruning.importance import calibrate
from accel.pruning.plan import Plan, load_plan, protected_blocks, remove_blocks
from accel.spec import parse_spec
from helpers import registries_empty, run

FAMILIES = ["tiny-flux", "tiny-wan", "tiny-sd3"]
PROMPTS = ["a red circle on the left", "a blue square at the top"]


@pytest.fixture(scope="module")
def flux_plan(load, tmp_path_factory):
    """A calibrated plan of tiny-flux, written to a file."""
    pipe = load("tiny-flux")
    plan = calibrate(pipe, PROMPTS, steps=2, seeds=1, progress=False, height=64, width=64)
    return plan.save(tmp_path_factory.mktemp("plan") / "plan.json")


@pytest.mark.parametrize("name", FAMILIES)
def test_per_call_prune_skips_exactly_the_listed_blocks(load, name):
    pipe = load(name)
    plain = run(pipe, name)
    stack = {"tiny-flux": "single_transformer_blocks", "tiny-wan": "blocks", "tiny-sd3": "transformer_blocks"}[name]
    with accelerate(pipe, {"method": "prune", "blocks": [f"{stack}.1"]}) as report:
        out = run(pipe, name)
    data = report.as_dict()["blocks"]
    for s, counts in data.items():
        assert counts["skipped"] == (4 if s == stack else 0), (s, counts)
    assert report.details["prune"].skipped_blocks == 4
    assert not np.array_equal(plain, out)
    assert registries_empty(pipe.transformer)


def test_ratio_zero_is_bit_identical(load, flux_plan):
    pipe = load("tiny-flux")
    plain = run(pipe, "tiny-flux")
    with accelerate(pipe, {"method": "prune", "plan": str(flux_plan), "ratio": 0.0}) as report:
        out = run(pipe, "tiny-flux")
    assert np.array_equal(plain, out) and report.block_fraction_computed == 1.0
    pruned = load_pipeline("tiny-flux", prune_plan=flux_plan, prune_ratio=0.0)
    assert np.array_equal(plain, run(pruned, "tiny-flux"))


def test_first_block_is_never_pruned(load, flux_plan):
    pipe = load("tiny-flux")
    with pytest.raises(SpecError, match="first block"):
        with accelerate(pipe, {"method": "prune", "blocks": ["transformer_blocks.0"]}):
            run(pipe, "tiny-flux", num_inference_steps=1)
    plan = load_plan(flux_plan)
    assert set(protected_blocks(pipe.transformer)) == {"transformer_blocks.0", "single_transformer_blocks.0"}
    for score in ("influence", "drop_one", "angular"):
        chosen = plan.select(0.5, score)
        assert chosen and not set(chosen) & set(plan.protected), score
    with pytest.raises(AccelError, match="protected"):
        remove_blocks(load_pipeline("tiny-flux").transformer, ["single_transformer_blocks.0"])


def test_sd3_last_block_is_protected(load):
    pipe = load("tiny-sd3")
    assert protected_blocks(pipe.transformer) == ["transformer_blocks.0", "transformer_blocks.1"]


def test_calibration_is_deterministic_and_complete(load, flux_plan):
    pipe = load("tiny-flux")
    again = calibrate(pipe, PROMPTS, steps=2, seeds=1, progress=False, height=64, width=64).to_dict()
    first = json.loads(flux_plan.read_text())
    assert again == first
    names = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert set(first["scores"]["influence"]) == set(names)
    assert set(first["scores"]["drop_one"]) == {"transformer_blocks.1", "single_transformer_blocks.1"}
    assert first["order"] == first["orders"]["drop_one"] and len(first["order"]) == 2
    assert first["fingerprint"]["blocks"] == {"transformer_blocks": 2, "single_transformer_blocks": 2}
    assert all(v > 0 for v in first["scores"]["drop_one"].values())
    assert set(first["angular"]["single_transformer_blocks"]) == {"1"}


def test_mismatched_plan_is_refused(load, flux_plan, tmp_path):
    sd3 = load("tiny-sd3")
    with pytest.raises(SpecError, match="does not match"):
        with accelerate(sd3, {"method": "prune", "plan": str(flux_plan), "ratio": 0.3}):
            run(sd3, "tiny-sd3", num_inference_steps=1)
    with pytest.raises(AccelError, match="does not match"):
        load_pipeline("bench-flux", prune_plan=flux_plan, prune_ratio=0.1)
    pruned = load_pipeline("tiny-flux", prune_plan=flux_plan, prune_ratio=0.25)
    with pytest.raises(SpecError, match="already pruned"):  # a plan does not fit the model it pruned
        with accelerate(pruned, {"method": "prune", "plan": str(flux_plan), "ratio": 0.25}):
            run(pruned, "tiny-flux", num_inference_steps=1)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(AccelError, match="not a plan file"):
        load_pipeline("tiny-flux", prune_plan=bad, prune_ratio=0.1)
    with pytest.raises(SpecError, match="exactly one"):
        parse_spec({"method": "prune", "ratio": 0.2})
    with pytest.raises(AccelError, match="needs prune_plan"):
        load_pipeline("tiny-flux", prune_ratio=0.2)


def test_pruned_model_has_expected_size_and_round_trips(load, flux_plan, tmp_path):
    full = load("tiny-flux")
    plan = Plan.from_dict(json.loads(flux_plan.read_text()))
    removed = plan.select(0.25)  # one of 4 blocks
    assert len(removed) == 1
    pruned = load_pipeline("tiny-flux", prune_plan=flux_plan, prune_ratio=0.25)
    assert pruned.accel_pruned["removed"] == removed
    stack, index = removed[0].rsplit(".", 1)
    block_params = sum(p.numel() for p in getattr(full.transformer, stack)[int(index)].parameters())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pruned.transformer) == count(full.transformer) - block_params
    key = {"transformer_blocks": "num_layers", "single_transformer_blocks": "num_single_layers"}[stack]
    assert len(getattr(pruned.transformer, stack)) == 1 == pruned.transformer.config[key]
    # the pruned model computes what per-call skipping of the same block computes
    with accelerate(full, {"method": "prune", "blocks": removed}):
        skipped = run(full, "tiny-flux")
    out = run(pruned, "tiny-flux")
    assert np.array_equal(out, skipped)
    pruned.save_pretrained(tmp_path / "pruned")
    back = load_pipeline(str(tmp_path / "pruned"))
    assert count(back.transformer) == count(pruned.transformer)
    assert np.array_equal(run(back, "tiny-flux"), out)


def test_pruning_on_wan_and_sd3_round_trips(tmp_path):
    for name, stack in [("tiny-wan", "blocks"), ("tiny-sd3", "transformer_blocks")]:
        pipe = load_pipeline(name)
        before = sum(p.numel() for p in pipe.transformer.parameters())
        if name == "tiny-sd3":  # 2 blocks: first and last are both protected
            with pytest.raises(AccelError, match="protected"):
                remove_blocks(pipe.transformer, [f"{stack}.1"])
            continue
        remove_blocks(pipe.transformer, [f"{stack}.1"])
        assert pipe.transformer.config.num_layers == 1 and sum(p.numel() for p in pipe.transformer.parameters()) < before
        out = run(pipe, name)
        pipe.save_pretrained(tmp_path / name)
        assert np.array_equal(run(load_pipeline(str(tmp_path / name)), name), out)


def test_cli_calibrate_writes_a_plan_and_interrupt_writes_nothing(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "plan.json"
    argv = ["prune", "calibrate", "--model", "tiny-flux", "--prompts", str(prompts), "--out", str(out),
            "--steps", "1", "--height", "64", "--width", "64"]
    assert main(argv) == 0 and load_plan(out).recommended == "drop_one"
    out.unlink()
    import accel.pruning.importance as importance

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(importance, "_latent", interrupted)
    assert main(argv) == 130
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    assert "no plan written" in capsys.readouterr().err


def test_named_plans_only_when_the_caller_names_them(load, flux_plan, tmp_path):
    """The server parses with the model's plan names: a path (even of a valid plan) is refused at parse time, so
    nothing is opened; a configured name prunes exactly like the plan's path does from the library."""
    for spec in (f"prune:plan={flux_plan},ratio=0.3", "prune:plan=/etc/shadow,ratio=0.3", "prune:plan=~/x"):
        with pytest.raises(SpecError, match="unknown plan") as info:
            parse_spec(spec, plans={"third"})
        assert info.value.field == "prune.plan" and "this model's plans: third" in str(info.value)
    with pytest.raises(SpecError, match="none are configured"):
        parse_spec("prune:plan=third,ratio=0.3", plans=())
    pipe = load_pipeline("tiny-flux", prune_plans={"third": flux_plan})
    assert set(pipe.accel_prune_plans) == {"third"}
    with accelerate(pipe, parse_spec("prune:plan=third,ratio=0.3", plans=pipe.accel_prune_plans)) as named:
        by_name = run(pipe, "tiny-flux")
    with accelerate(pipe, f"prune:plan={flux_plan},ratio=0.3") as by_path_report:
        by_path = run(pipe, "tiny-flux")
    assert np.array_equal(by_name, by_path) and named.details["prune"].pruned == by_path_report.details["prune"].pruned
    assert named.details["prune"].pruned


@pytest.mark.parametrize("content", ['{"format": "accel-prune-plan/1", "fingerprint": 3, "protected": [], "scores": {}}',
                                     '{"format": "accel-prune-plan/1"}', '["accel-prune-plan/1"]',
                                     '{"format": "secret-value-123"}', "[" * 100000, "\xff\xfe"])
def test_a_file_that_is_not_a_plan_is_a_clear_error_that_echoes_nothing(tmp_path, content):
    path = tmp_path / "not-a-plan.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(AccelError) as info:
        load_plan(path)
    assert "secret-value" not in str(info.value)
    with pytest.raises(AccelError):
        load_pipeline("tiny-flux", prune_plans={"bad": path})


def test_plan_names_are_checked_on_parsed_specs_too():
    """A spec passed as an already parsed `AccelSpec` or as config objects is held to the same plan names."""
    parsed = parse_spec("prune:plan=/etc/passwd,ratio=0.3")
    for spec in (parsed, list(parsed)):
        with pytest.raises(SpecError, match="unknown plan"):
            parse_spec(spec, plans={"good"})
