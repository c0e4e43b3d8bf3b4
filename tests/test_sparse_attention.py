"""sparse_attention (AdaSpa): sparsity 0 == plain, exact schedule and search counts, budgets over the non-sink
blocks, sink, head-adaptive averages, composition with caching, knob errors, nothing left behind; sparse calls
between searches neither sync nor rebuild the block index; layouts with nothing to skip run dense for free."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.hooks.hooks import StateManager

import kernels.block_sparse
from accel import SpecError, accelerate
from accel.attention import search
from accel.attention.sparse import Schedule, SparseAttentionConfig, SparseCounters, SparseRouter, SparseState
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


def _keep_every_block(monkeypatch):
    """Searches keep every block: the sparse path (search, index lists, kernel) must then equal plain attention."""
    def keep_all(weights, sparsity, n_sink):
        return torch.ones_like(weights, dtype=torch.bool)

    monkeypatch.setattr(search, "select_blocks", keep_all)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
def test_sparsity_zero_matches_plain_and_leaves_nothing(load, name):
    """Sparsity 0 drops no block: dense through the model's own attention (bit-identical), no search."""
    pipe = load(name)
    before = _processors(pipe)
    plain = _run(pipe, name)
    with accelerate(pipe, f"sparse_attention:sparsity=0,dense_steps=0,{REF}") as report:
        out = _run(pipe, name)
    np.testing.assert_allclose(out, plain, atol=1e-4)
    assert np.array_equal(out, plain)
    d = report.details["sparse_attention"]
    assert d.attention_blocks_computed == d.attention_blocks_total > 0
    assert d.searches == d.sparse_calls == 0 and d.dense_fallback_calls == d.dense_calls > 0
    assert "no key block to drop" in d.dense_fallback_reason
    assert registries_empty(pipe.transformer)
    assert all(a is b for a, b in zip(_processors(pipe), before))
    assert np.array_equal(_run(pipe, name), plain)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
def test_every_block_kept_through_the_kernel_matches_plain(load, monkeypatch, name):
    pipe = load(name)
    plain = _run(pipe, name)
    _keep_every_block(monkeypatch)
    with accelerate(pipe, f"sparse_attention:sparsity=0.5,dense_steps=0,{REF}") as report:
        out = _run(pipe, name)
    np.testing.assert_allclose(out, plain, atol=1e-4)
    d = report.details["sparse_attention"]
    assert d.attention_blocks_computed == d.attention_blocks_total > 0
    assert d.sparse_calls > 0 and d.dense_fallback_calls == 0
    assert registries_empty(pipe.transformer)


@pytest.mark.slow
def test_sparsity_zero_matches_plain_with_compiled_flex(load, monkeypatch):
    """Every block kept, through compiled flex (its BlockMask built at the search, reused by the sparse calls)."""
    pipe = load("tiny-wan")
    plain = _run(pipe, "tiny-wan", steps=3)
    _keep_every_block(monkeypatch)
    with accelerate(pipe, "sparse_attention:sparsity=0.5,dense_steps=0,block_size=16,backend=flex") as report:
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
    k = sink + max(round(0.5 * (nb - sink)), 1)  # the sink, then half of the other blocks
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
    assert k[0].tolist() == [8, 6, 4, 2, 2, 1]  # round((1 - s) * 8) of the 8 non-sink blocks, at least 1
    rows = mask[:, :, n_sink:].sum(-1)
    assert (rows == n_sink + k[..., None]).all()  # the sink plus the same k for every non-sink row of a head
    assert (mask.sum((-1, -2)) == n_sink * 10 + (10 - n_sink) * (n_sink + k)).all()
    # kept = the sink plus the top-k non-sink blocks by importance
    row = w[0, 3, 5, n_sink:]
    top = set((torch.topk(row, 2).indices + n_sink).tolist())
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


# -- budget over the non-sink blocks (FLUX layout at 1024x1024: 512 text tokens, then 64 x 64 image tokens) ------
def _flux_layout_importance(temps, text=512, image=4096, d=16, block=64):
    """Exact block importance of a FLUX-like layout built from q/k directly: keys cluster per block around a random
    direction; queries point at their own block's direction with a per-head temperature (0: flat head, large: a
    head that attends to its own block)."""
    g = torch.Generator().manual_seed(0)
    length, heads = text + image, len(temps)
    nb = math.ceil(length / block)
    centres = torch.randn(heads, nb, d, generator=g).repeat_interleave(block, 1)[:, :length]
    k = (centres + 0.3 * torch.randn(heads, length, d, generator=g))[None]
    q = (centres * torch.tensor(temps)[:, None, None])[None]
    weights, _, _ = search.exact_importance(q, k, k, block, "flex", None)  # CPU: ATen flash attention + LSE
    return weights, search.sink_blocks(text, block)


def test_flux_image_rows_keep_image_blocks_at_paper_sparsity():
    weights, n_sink = _flux_layout_importance([0.0, 0.1, 4.0, 4.0])
    assert n_sink == 8 and weights.shape[-1] == 72
    base = torch.full((1, 4), 0.8, dtype=torch.float64)
    mask = search.select_blocks(weights, base, n_sink)
    assert mask[:, :, :n_sink].all() and mask[:, :, :, :n_sink].all()  # text rows and text columns kept
    assert (mask[:, :, n_sink:, n_sink:].sum(-1) == round(0.2 * 64)).all()  # 13 of 64 image blocks, every row
    sparsity, recall = search.head_sparsities(weights, 0.8, n_sink, adaptive=True)
    promoted, demoted = ((sparsity - level).abs() < 1e-9 for level in (0.9, 0.7))
    assert promoted.sum() == 2 and demoted.sum() == 2, recall  # the two peaked heads promoted
    mask = search.select_blocks(weights, sparsity, n_sink)
    image = mask[:, :, n_sink:, n_sink:].sum(-1)
    for h, s in enumerate(sparsity[0].tolist()):
        assert (image[0, h] == round((1 - s) * 64)).all()  # 6 for a promoted head, 19 for a demoted one
    assert (image >= 1).all()


def _router(config: SparseAttentionConfig, text_len: int, num_steps: int = 10):
    """A router outside a pipeline: a stand-in session whose step the test sets, one branch, dense SDPA as the
    model's own attention."""
    session = SimpleNamespace(plan=SimpleNamespace(num_steps=num_steps), current=None)
    state = StateManager(SparseState)
    state.set_context(SimpleNamespace(name="cond"))
    router = SparseRouter(session, config, state, 0, text_first=True, counters=SparseCounters())
    router.original = lambda q, k, v, *a, **kw: torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    router.text_len = text_len

    def call(step, q, k, v):
        session.current = SimpleNamespace(step_index=step, branch="cond")
        return router(q, k, v)

    return router, state, call


def test_lse_cached_search_equals_exact_search_when_the_lse_did_not_change():
    config = SparseAttentionConfig(sparsity=0.6, dense_steps=2, search_steps=[2, 5], block_size=16, backend="reference")
    router, state, call = _router(config, text_len=20)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 150, 4, 16, generator=g) for _ in range(3))  # (B, L, H, D): 10 blocks, 2 of text
    call(2, q, k, v)  # first search: dense pass for the LSE, then the importance
    exact = state.get_state().layers[0].blocks
    call(3, q, k, v)
    call(5, q, k, v)  # second search: the cached LSE, same inputs
    cached = state.get_state().layers[0].blocks
    assert router.counters.dense_searches == router.counters.lse_cached_searches == 1
    assert cached is not exact
    assert torch.equal(cached.counts, exact.counts) and torch.equal(cached.indices, exact.indices)
    assert torch.equal(cached.to_mask(), exact.to_mask()) and cached.kept == exact.kept < 4 * 100


@pytest.mark.parametrize("name,cfg", [("tiny-flux", True), ("tiny-wan", False)])
def test_sparse_calls_between_searches_never_sync_nor_rebuild_the_index(load, monkeypatch, name, cfg):
    """Between searches a call reads the stored index lists and their count: no Tensor.sum/.item()/int()/bool()
    on a tensor (each a device sync on GPU), no new block index; the counts are those of the masks."""
    pipe = load(name)
    built, guarded = [], [False]
    index = kernels.block_sparse.mask_to_kv_blocks

    def counting_index(mask):
        built.append(int(mask.sum()))
        return index(mask)

    monkeypatch.setattr(kernels.block_sparse, "mask_to_kv_blocks", counting_index)
    for attr in ("sum", "item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
        def forbidden(self, *a, _attr=attr, _original=getattr(torch.Tensor, attr), **kw):
            if guarded[0]:
                raise AssertionError(f"Tensor.{_attr} in a sparse call between searches")
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    routed = SparseRouter.__call__

    def watched(self, *args, **kwargs):
        ctx = self.session.current
        schedule = self.schedule
        guarded[0] = ctx is not None and schedule.sparse(ctx.step_index) and ctx.step_index not in schedule.searches
        try:
            return routed(self, *args, **kwargs)
        finally:
            guarded[0] = False

    monkeypatch.setattr(SparseRouter, "__call__", watched)
    with accelerate(pipe, f"sparse_attention:sparsity=0.5,dense_steps=2,search_steps=[2],{REF}") as report:
        _run(pipe, name, steps=6, cfg=cfg)
    d = report.details["sparse_attention"]
    layers, branches = GEOMETRY[name]["layers"], 2 if cfg else 1
    assert d.searches == len(built) == layers * branches  # one index per search, none per call
    assert d.sparse_calls == 3 * layers * branches  # steps 3, 4, 5
    assert d.attention_blocks_computed - 3 * d.attention_blocks_total // 6 == 3 * sum(built)


def test_nothing_to_skip_rule():
    assert search.dense_reason(2, 0, 0.8, True, 4).startswith("2 block(s)")
    assert search.dense_reason(3, 2, 0.9, True, 4).startswith("no key block to drop")  # 1 image block: always kept
    assert search.dense_reason(4, 2, 0.2, False, 4)  # round(0.8 * 2) = 2 of 2 kept
    assert search.dense_reason(4, 2, 0.2, True, 4) == ""  # the promoted head (0.4) keeps 1 of 2
    assert search.dense_reason(4, 2, 0.2, True, 1)  # one head: no promotion
    assert search.dense_reason(6, 2, 0.0, True, 4)  # sparsity 0
    assert search.dense_reason(72, 8, 0.8, True, 24) == ""


@pytest.mark.parametrize("size,text", [(64, 16), (128, 32)])  # 32 tokens (shapes-flux's layout), 96 tokens
def test_nothing_to_skip_runs_dense_without_search_or_compile(load, monkeypatch, size, text):
    """Blocks of 64 over 32 or 96 tokens: one or two blocks. Plain output, no search, flex never compiled."""
    pipe = load("tiny-flux")
    kwargs = dict(height=size, width=size, max_sequence_length=text, num_inference_steps=4)
    plain = run(pipe, "tiny-flux", **kwargs)

    def forbidden(*args, **kw):
        raise AssertionError("no search and no compilation when there is nothing to skip")

    for module, attr in ((torch, "compile"), (kernels.block_sparse, "compiled_flex_attention"),
                         (search, "exact_importance"), (search, "pooled_importance")):
        monkeypatch.setattr(module, attr, forbidden)
    with accelerate(pipe, "sparse_attention:dense_steps=0") as report:  # paper defaults: blocks of 64, auto backend
        out = run(pipe, "tiny-flux", **kwargs)
    assert np.array_equal(out, plain)
    d = report.details["sparse_attention"]
    assert d.searches == d.sparse_calls == 0
    assert d.dense_fallback_calls == d.dense_calls == 4 * GEOMETRY["tiny-flux"]["layers"]
    assert "fewer than 3" in d.dense_fallback_reason
    assert d.attention_blocks_computed == d.attention_blocks_total > 0
