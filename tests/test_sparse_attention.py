"""sparse_attention (AdaSpa): sparsity 0 == plain, exact schedule and search counts, budgets, sink, head-adaptive
averages, composition with caching, knob errors, nothing left behind."""

import math

import numpy as np
import pytest
import torch

from accel import SpecError, accelerate
from accel.attention import search
from accel.attention.sparse import Schedule, SparseAttentionConfig
from accel.spec import parse_spec
from helpers import registries_empty, run

# sizes with several blocks of 16: FLUX 128x128 -> 64 image tokens after 32 text tokens (L=96, 6 blocks, 2 of
# text); Wan 9 frames of 128x128 -> 3 x 8 x 8 = 192 video tokens (12 blocks)
SIZES = {
    "tiny-flux": dict(height=128, width=128, max_sequence_length=32),
    "tiny-wan": dict(height=128, width=128, num_frames=9),
}
GEOMETRY = {"tiny-flux": dict(length=96, text=32, heads=4, layers=4), "tiny-wan": dict(length=192, text=0, heads=2, layers=2)}
REF = "backend=reference,block_size=16"


def _run(pipe, name, steps=6, **kw):
    return run(pipe, name, num_inference_steps=steps, **SIZES[name], **kw)


def _processors(pipe):
    return [m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")]


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
def test_sparsity_zero_matches_plain_and_leaves_nothing(load, name):
    pipe = load(name)
    before = _processors(pipe)
    plain = _run(pipe, name)
    with accelerate(pipe, f"sparse_attention:sparsity=0,dense_steps=0,{REF}") as report:
        out = _run(pipe, name)
    np.testing.assert_allclose(out, plain, atol=1e-4)
    d = report.details["sparse_attention"]
    assert d.attention_blocks_computed == d.attention_blocks_total > 0
    assert d.sparse_calls > 0
    assert registries_empty(pipe.transformer)
    assert all(a is b for a, b in zip(_processors(pipe), before))
    assert np.array_equal(_run(pipe, name), plain)


@pytest.mark.slow
def test_sparsity_zero_matches_plain_with_compiled_flex(load):
    pipe = load("tiny-wan")
    plain = _run(pipe, "tiny-wan", steps=3)
    with accelerate(pipe, "sparse_attention:sparsity=0,dense_steps=0,block_size=16,backend=flex") as report:
        out = _run(pipe, "tiny-wan", steps=3)
    np.testing.assert_allclose(out, plain, atol=1e-4)
    assert report.details["sparse_attention"].sparse_calls > 0


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
def test_no_sparse_step_is_bit_identical(load, name):
    """Searches scheduled past the last step: every call goes through the model's own dispatch."""
    pipe = load(name)
    plain = _run(pipe, name)
    with accelerate(pipe, f"sparse_attention:search_steps=[50],dense_steps=0,{REF}") as report:
        out = _run(pipe, name)
    assert np.array_equal(out, plain)
    assert report.details["sparse_attention"].searches == 0


@pytest.mark.parametrize("name,cfg", [("tiny-flux", True), ("tiny-wan", False)])
def test_searches_exactly_at_configured_steps_and_budgets(load, name, cfg):
    pipe = load(name)
    geo = GEOMETRY[name]
    branches = 2 if cfg else 1
    with accelerate(pipe, f"sparse_attention:sparsity=0.5,head_adaptive=false,dense_steps=2,search_steps=[2,4],{REF}") as report:
        _run(pipe, name, steps=6, cfg=cfg)
    d = report.details["sparse_attention"]
    layers = geo["layers"]
    assert d.search_steps == [2, 4]
    assert d.searches == 2 * layers * branches
    assert d.dense_searches == d.lse_cached_searches == layers * branches
    nb = geo["length"] // 16
    sink = math.ceil(geo["text"] / 16)
    k = max(round(0.5 * nb), sink, 1)
    per_head_sparse = sink * nb + (nb - sink) * k  # the budget: sink rows full, other rows k blocks
    full = nb * nb
    calls_per_step = layers * branches
    # steps 0, 1 dense; step 2 dense search pass (its output is dense); steps 3..5 sparse (4 is a cached-LSE search)
    expected = geo["heads"] * calls_per_step * (3 * full + 3 * per_head_sparse)
    assert d.attention_blocks_total == geo["heads"] * calls_per_step * 6 * full
    assert d.attention_blocks_computed == expected
    assert d.sparse_calls == 3 * calls_per_step and d.dense_calls == 3 * calls_per_step


def test_text_sink_always_kept_in_every_flux_block(load, monkeypatch):
    pipe = load("tiny-flux")
    seen = []
    original = search.select_blocks

    def spy(weights, sparsity, n_sink):
        mask = original(weights, sparsity, n_sink)
        seen.append((n_sink, mask))
        return mask

    monkeypatch.setattr(search, "select_blocks", spy)
    with accelerate(pipe, f"sparse_attention:sparsity=0.9,dense_steps=1,{REF}"):
        _run(pipe, "tiny-flux", steps=4)
    # searches at step 1 and round(0.6 * 4) = 2 in every layer; select_blocks runs twice per search (recall, final)
    assert len(seen) == 2 * 2 * GEOMETRY["tiny-flux"]["layers"]
    for n_sink, mask in seen:
        assert n_sink == 2  # ceil(32 text tokens / 16), dual and single blocks alike
        assert mask[:, :, :n_sink, :].all() and mask[:, :, :, :n_sink].all()
        assert not mask.all()


def test_select_blocks_budget_per_head_and_ragged_sink():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(2, 6, 10, 10, generator=g)
    sparsity = torch.tensor([[0.0, 0.3, 0.5, 0.7, 0.8, 0.95]] * 2)
    n_sink = search.sink_blocks(20, 16)  # 20 text tokens straddle into block 1: two sink blocks
    assert n_sink == 2 and search.sink_blocks(0, 16) == 0 and search.sink_blocks(16, 16) == 1
    mask = search.select_blocks(w, sparsity, n_sink)
    k = search.budgets(sparsity, 10, n_sink)
    assert k[0].tolist() == [10, 7, 5, 3, 2, 2]  # round((1 - s) * 10), at least the 2 sink blocks
    rows = mask[:, :, n_sink:].sum(-1)
    assert (rows == k[..., None]).all()  # the same k for every non-sink row of a head
    assert (mask.sum((-1, -2)) == n_sink * 10 + (10 - n_sink) * k).all()
    # kept = the top-(k - sink) non-sink blocks by importance
    row = w[0, 3, 5, n_sink:]
    top = set((torch.topk(row, 1).indices + n_sink).tolist())
    assert top | {0, 1} == set(mask[0, 3, 5].nonzero().flatten().tolist())


@pytest.mark.parametrize("base", [0.2, 0.5, 0.8, 0.9])
def test_head_adaptive_budgets_average_to_target(base):
    g = torch.Generator().manual_seed(1)
    # heads of graded concentration: peaked heads recall a lot, flat heads little
    temps = torch.tensor([0.05, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0])
    w = torch.softmax(torch.randn(1, 8, 12, 12, generator=g) * temps[None, :, None, None], -1)
    s, rec = search.head_sparsities(w, base, 0, adaptive=True)
    assert s.mean().item() == pytest.approx(base, abs=1e-6)
    n = min(int((rec > 0.8).sum()), 4)
    order = torch.argsort(rec[0], descending=True)
    if n:
        delta = min((1 - base) / 2, base)
        assert s[0, order[:n]].tolist() == pytest.approx([base + delta] * n)
        assert s[0, order[-n:]].tolist() == pytest.approx([base - delta] * n)
    if base == 0.8 and n:
        assert s[0, order[0]].item() == pytest.approx(0.9) and s[0, order[-1]].item() == pytest.approx(0.7)
    off, _ = search.head_sparsities(w, base, 0, adaptive=False)
    assert (off == base).all()


def test_pooled_estimator_needs_no_dense_pass(load):
    pipe = load("tiny-wan")
    with accelerate(pipe, f"sparse_attention:sparsity=0.5,estimator=pooled,dense_steps=1,{REF}") as report:
        _run(pipe, "tiny-wan", steps=4)
    d = report.details["sparse_attention"]
    assert d.searches == 2 * 2 and d.dense_searches == d.lse_cached_searches == 0
    assert d.attention_blocks_computed < d.attention_blocks_total
    w = search.pooled_importance(torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), 16)
    torch.testing.assert_close(w.sum(-1), torch.tensor([16.0, 16.0, 8.0]).expand(1, 2, 3))


def test_composes_with_sortblock_cached_blocks_skip_attention(load):
    pipe = load("tiny-flux")
    geo = GEOMETRY["tiny-flux"]
    sparse = f"sparse_attention:sparsity=0.5,dense_steps=1,{REF}"
    cache = "sortblock:K=3,window=step_fraction,start=0,end=1,schedule=constant,beta=0.3"
    with accelerate(pipe, sparse) as alone:
        _run(pipe, "tiny-flux", steps=8)
    with accelerate(pipe, [sparse, cache]) as both:
        _run(pipe, "tiny-flux", steps=8)
    assert [m.split(":")[0] for m in both.methods] == ["sparse_attention", "sortblock"]
    per_call = geo["heads"] * (geo["length"] // 16) ** 2
    computed_blocks = sum(both.blocks_computed.values())
    assert computed_blocks < sum(both.blocks_total.values())  # sortblock skipped blocks
    d, a = both.details["sparse_attention"], alone.details["sparse_attention"]
    assert d.attention_blocks_total == computed_blocks * per_call  # only computed blocks ran attention
    assert d.attention_blocks_total < a.attention_blocks_total
    assert d.attention_blocks_computed < d.attention_blocks_total
    assert registries_empty(pipe.transformer)


@pytest.mark.parametrize(
    "spec,field",
    [
        ("sparse_attention:sparsity=1.5", "sparse_attention.sparsity"),
        ("sparse_attention:block_size=48", "sparse_attention.block_size"),
        ("sparse_attention:dense_steps=2.5", "sparse_attention.dense_steps"),
        ("sparse_attention:search_steps=[1.5]", "sparse_attention.search_steps"),
        ("sparse_attention:estimator=magic", "sparse_attention.estimator"),
        ("sparse_attention:backend=cuda", "sparse_attention.backend"),
        ("sparse_attention:layers=[-1]", "sparse_attention.layers"),
        ("sparse_attention:dense_steps=10,search_steps=[5,30]", "search_steps"),
    ],
)
def test_bad_knobs_name_the_field(spec, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_spec(spec)


def test_schedule_resolution():
    cfg = SparseAttentionConfig()
    assert Schedule.resolve(cfg, 50) == Schedule(start=10, searches=frozenset({10, 30}))
    cfg = SparseAttentionConfig(dense_steps=3, search_steps=[0.5, 8])
    assert Schedule.resolve(cfg, 20) == Schedule(start=8, searches=frozenset({8, 10}))
    assert not Schedule.resolve(cfg, 20).sparse(7) and Schedule.resolve(cfg, 20).sparse(8)


def test_sd3_is_refused_clearly(load):
    pipe = load("tiny-sd3")
    with pytest.raises(SpecError, match="flux, wan"):
        with accelerate(pipe, "sparse_attention"):
            pass
