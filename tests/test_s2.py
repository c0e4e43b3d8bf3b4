"""S²-Guidance: off is bit-identical, masks are reproducible, the sub-network is exactly the full network minus the
drawn blocks, the correction is the paper's formula, and caches never see the sub-network pass."""

import numpy as np
import pytest
import torch

from accel import SpecError, accelerate
from accel.adapters import ModelAdapter
from accel.guidance.s2 import S2Config, draw_mask, drop_count, eligible_blocks
from accel.spec import parse_spec
from helpers import registries_empty, run

FAMILIES = ["tiny-flux", "tiny-wan", "tiny-sd3"]
ALWAYS = "s2:interval=[0,1]"  # active on every step


class BlockLog:
    """Names of executed blocks, in order, from native pre-hooks on their attention (independent of our hooks)."""

    def __init__(self, pipe):
        from accel.adapters import adapter_for

        self.names: list[str] = []
        self.handles = []
        self.sizes = {}
        for stack, blocks in adapter_for(pipe).block_stacks(pipe.transformer).items():
            self.sizes[stack] = len(blocks)
            for i, block in enumerate(blocks):
                attn = getattr(block, "attn", None) or block.attn1  # runs only when the block's forward does
                self.handles.append(attn.register_forward_pre_hook(lambda *_, n=f"{stack}.{i}": self.names.append(n)))

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
def test_omega_zero_and_inactive_interval_are_bit_identical(load, name, cfg):
    pipe = load(name)
    plain = run(pipe, name, cfg=cfg)
    for spec in ["s2:omega=0,interval=[0,1]", "s2:interval=[0.99,0.995]"]:
        with accelerate(pipe, spec, seed=3) as report:
            out = run(pipe, name, cfg=cfg)
        assert np.array_equal(plain, out), spec
        assert report.extra_forwards == 0 and report.block_fraction_computed == 1.0
        assert registries_empty(pipe.transformer)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
def test_s2_changes_the_output_reproducibly_at_one_extra_forward_per_active_step(load, name, cfg):
    pipe = load(name)
    plain = run(pipe, name, cfg=cfg)
    outs = []
    for _ in range(2):
        with accelerate(pipe, ALWAYS, seed=0) as report:
            outs.append(run(pipe, name, cfg=cfg))
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(plain, outs[0])
    details = report.details["s2"]
    assert details.active_steps == 4 and report.extra_forwards == 4
    assert report.block_fraction_computed == 1.0  # the pipeline's own calls are all computed, the pass is extra
    assert registries_empty(pipe.transformer)


def test_another_seed_draws_other_masks_and_changes_the_output(load):
    pipe = load("bench-flux")
    kwargs = dict(height=64, width=64, num_inference_steps=3)
    sizes = {"transformer_blocks": 4, "single_transformer_blocks": 8}
    eligible = {s: list(range(1, n)) for s, n in sizes.items()}
    masks = {seed: [draw_mask(eligible, sizes, 0.3, seed, step, 0) for step in range(3)] for seed in (0, 1)}
    assert masks[0] != masks[1]
    outs = {}
    for seed in (0, 1, 0):
        with accelerate(pipe, "s2:interval=[0,1],drop_ratio=0.3", seed=seed):
            out = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
        assert seed not in outs or np.array_equal(outs[seed], out)
        outs[seed] = out
    assert not np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("name", FAMILIES)
def test_subnetwork_runs_exactly_the_blocks_not_drawn(load, name):
    pipe = load(name)
    log = BlockLog(pipe)
    try:
        with accelerate(pipe, ALWAYS + ",passes=2", seed=5) as report:
            run(pipe, name)
    finally:
        log.close()
    every = [f"{s}.{i}" for s, n in log.sizes.items() for i in range(n)]
    eligible = {s: list(range(1, n)) for s, n in log.sizes.items()}
    expected = []
    for step in range(4):
        expected += every
        for p in range(2):
            mask = draw_mask(eligible, log.sizes, 0.1, 5, step, p)
            expected += [b for b in every if int(b.rsplit(".", 1)[1]) not in mask[b.rsplit(".", 1)[0]]]
            assert all(len(v) == 1 for v in mask.values())  # 2-block stacks: block 1 is the only candidate
    assert log.names == expected
    d = report.details["s2"]
    dropped = 4 * 2 * len(log.sizes)
    assert d.extra_forwards == 8 and d.subnet_blocks_dropped == dropped
    assert d.subnet_blocks_computed == 4 * 2 * len(every) - dropped
    assert sum(report.blocks_computed.values()) == 4 * len(every)


def _direct_inputs(pipe, batch):
    """Transformer inputs of SD3 or FLUX for a direct call at the scheduler's second timestep."""
    g = torch.Generator().manual_seed(0)
    t = pipe.transformer
    dynamic = pipe.scheduler.config.get("use_dynamic_shifting", False)
    pipe.scheduler.set_timesteps(4, **({"mu": 1.0} if dynamic else {}))
    timestep = pipe.scheduler.timesteps[1].expand(batch)
    if type(t).__name__ == "SD3Transformer2DModel":
        c = t.config
        return dict(hidden_states=torch.randn(batch, c.in_channels, 8, 8, generator=g), timestep=timestep,
                    encoder_hidden_states=torch.randn(batch, 6, c.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g), return_dict=False)
    c = t.config
    return dict(hidden_states=torch.randn(batch, 16, c.in_channels, generator=g), timestep=timestep / 1000,
                encoder_hidden_states=torch.randn(batch, 6, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
                guidance=torch.full((batch,), 3.5), txt_ids=torch.zeros(6, 3), img_ids=torch.zeros(16, 3),
                return_dict=False)


def test_correction_is_the_paper_formula_with_batched_cfg(load):
    pipe = load("tiny-sd3")
    pipe._guidance_scale = 4.0  # lambda of SD3's combine; > 1 means the call is cat([uncond, cond])
    kw = _direct_inputs(pipe, 2)
    half = {k: v[1:] if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with torch.no_grad():
        full = pipe.transformer(**kw)[0]
        with accelerate(pipe, {"method": "prune", "blocks": ["transformer_blocks.1"]}):
            d_hat = pipe.transformer(**half)[0]
        with accelerate(pipe, "s2:interval=[0,1],omega=0.5", seed=0) as report:
            out = pipe.transformer(**kw)[0]
    assert report.details["s2"].extra_forwards == 1
    assert torch.equal(out[:1], full[:1])  # the uncond half is untouched
    cond = full[1:]
    torch.testing.assert_close(out[1:], cond - (0.5 / 4.0) * (d_hat - cond), rtol=0, atol=1e-6)


def test_correction_without_cfg_is_applied_to_the_conditional_prediction(load):
    pipe = load("tiny-flux")
    kw = _direct_inputs(pipe, 1)
    with torch.no_grad():
        full = pipe.transformer(**kw)[0]
        with accelerate(pipe, {"method": "prune", "blocks": ["transformer_blocks.1", "single_transformer_blocks.1"]}):
            d_hat = pipe.transformer(**kw)[0]
        with accelerate(pipe, "s2:interval=[0,1],omega=0.25", seed=0):
            out = pipe.transformer(**kw)[0]
    torch.testing.assert_close(out, full - 0.25 * (d_hat - full), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,cfg,expected", [("tiny-flux", False, None), ("tiny-flux", True, 2.0),
                                               ("tiny-wan", False, None), ("tiny-wan", True, 3.0),
                                               ("tiny-sd3", True, 3.0)])
def test_cfg_scale_is_read_from_the_running_pipeline(load, monkeypatch, name, cfg, expected):
    pipe = load(name)
    seen = []
    original = ModelAdapter.cfg_scale
    monkeypatch.setattr(ModelAdapter, "cfg_scale", lambda *a: seen.append(original(*a)) or seen[-1])
    with accelerate(pipe, ALWAYS, seed=0):
        run(pipe, name, cfg=cfg, num_inference_steps=2)
    assert seen == [expected, expected]


def test_interval_selects_steps_by_noise_level(load):
    pipe = load("tiny-flux")
    with accelerate(pipe, "s2:interval=[0.1,0.9]", seed=0) as report:
        run(pipe, "tiny-flux", num_inference_steps=8)
    sigmas = [float(s) for s in pipe.scheduler.sigmas[:8]]
    assert report.details["s2"].active_steps == sum(0.1 <= s <= 0.9 for s in sigmas)
    assert 0 < report.details["s2"].active_steps < 8


@pytest.mark.parametrize("cache", ["sortblock:schedule=constant,beta=0.5,start=1000,end=0", "abcache:warmup=1,interval=2",
                                   "fbcache:threshold=0.2"])
def test_caches_never_see_the_subnetwork_pass(load, cache):
    pipe = load("tiny-flux")
    with accelerate(pipe, cache) as alone:
        run(pipe, "tiny-flux", num_inference_steps=8)
    with accelerate(pipe, [cache, ALWAYS], seed=0) as both:
        run(pipe, "tiny-flux", num_inference_steps=8)
    method = cache.split(":")[0]
    d = both.details["s2"]
    n_blocks = 4
    # every sub-network pass ran all its non-dropped blocks: no cache skipped or predicted any of them
    assert d.subnet_blocks_computed == d.extra_forwards * n_blocks - d.subnet_blocks_dropped
    if method == "sortblock":  # a constant schedule makes its work independent of the values
        assert alone.details[method] == both.details[method]
        assert alone.blocks_computed == both.blocks_computed
        assert d.active_steps == 8
    if method == "abcache":  # skipped steps never reach S² (its call hook is inside the cache's)
        assert alone.details[method] == both.details[method]
        assert d.active_steps == alone.details[method].computed_calls < 8
    assert registries_empty(pipe.transformer)


def test_bad_knobs_are_clear_errors(load):
    with pytest.raises(SpecError, match="interval"):
        parse_spec("s2:interval=[0.9,0.1]")
    with pytest.raises(SpecError, match="protected_blocks"):
        parse_spec('s2:protected_blocks=["blocks"]')
    pipe = load("tiny-flux")
    with pytest.raises(SpecError, match="no block"):
        with accelerate(pipe, 's2:protected_blocks=["blocks.1"]'):
            run(pipe, "tiny-flux", num_inference_steps=1)
    with pytest.raises(SpecError, match="dbcache"):
        with accelerate(pipe, ["dbcache", "s2"]):
            run(pipe, "tiny-flux", num_inference_steps=1)
    assert registries_empty(pipe.transformer)


def test_mask_rules():
    assert drop_count(24, 0.1) == 2 and drop_count(2, 0.1) == 1 and drop_count(10, 0.0) == 0
    sizes = {"a": 24}
    for step in range(20):
        mask = draw_mask({"a": list(range(1, 24))}, sizes, 0.1, 7, step, 0)
        assert len(mask["a"]) == 2 and 0 not in mask["a"]
    assert S2Config().interval == (0.1, 0.9) and S2Config().omega == 0.25


def test_protected_blocks_are_never_drawn(load):
    pipe = load("bench-flux")
    from accel.session import AccelSession

    session = AccelSession(pipe, [])
    eligible = eligible_blocks(session, ["single_transformer_blocks.3"])
    assert 0 not in eligible["transformer_blocks"] and 3 not in eligible["single_transformer_blocks"]
    assert eligible["single_transformer_blocks"] == [1, 2, 4, 5, 6, 7]
