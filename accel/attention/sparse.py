"""Block-sparse attention with an online per-head pattern search reused across steps (AdaSpa, arXiv 2502.21079).

Per targeted self-attention call (FLUX: the joint [text, image] attention of every block; Wan: `attn1`, the
self-attention over video tokens; Wan's cross-attention `attn2` stays dense):
- steps before the first search step: dense, through the model's own attention dispatch (bit-identical);
- a search step: the block importance of every (query block, key block) per head (`search.py`), then top-k
  masks with head-adaptive budgets over the non-text key blocks; the first exact search runs a dense pass with
  LSE (its output is the step's attention output) and caches the LSE per layer and CFG branch, later searches
  reuse that LSE (one pass);
- other sparse steps: the last search's kept blocks, through `kernels.block_sparse_attention` (Triton on GPU,
  compiled flex on CPU). A search stores them as index lists (`kernels.KVBlocks`: counts and indices, int32, as
  wide as the fullest row; the flex `BlockMask` too when flex runs), and their count as a Python int: a sparse
  call neither sorts, nor rebuilds a mask, nor waits on the device to count its work;
- nothing to skip (fewer than 3 blocks, or no non-sink key block the sparsest head would drop, e.g. 32 tokens in
  blocks of 64, or sparsity 0): dense through the model's own attention, with no search and no flex compilation
  (`dense_fallback_calls`, `dense_fallback_reason`).
Schedule: dense for the first `dense_steps`; searches at `search_steps` (default: the first sparse step and 0.6
of the steps, i.e. 10 and 30 of 50); state per CFG branch (the session's `ctx.branch`) and per layer.

Attention is routed per block by `accel/attention/routing.py` (the processor's own code, with
`dispatch_attention_fn` bound to this method's router). The router sends anything that is not a plain
self-attention call (a mask, different query/key lengths, e.g. Wan I2V's image cross-attention) and every dense
step to the original `dispatch_attention_fn`. The block hook's `pre_forward` also reads the block's text length
(FLUX single blocks receive the text already concatenated, their processor cannot see it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from diffusers.hooks.hooks import BaseState, StateManager
from pydantic import Field, field_validator, model_validator

from accel.adapters import ADAPTERS
from accel.attention import search
from accel.attention.routing import AttentionRoutingHook
from accel.base import Counters, Method, MethodConfig, MethodHandle
from accel.errors import UnsupportedModelError
from accel.session import AccelSession
from kernels import KVBlocks, block_sparse_attention, num_blocks, resolve_backend

SPARSE_HOOK = "accel_sparse_attention"


class SparseAttentionConfig(MethodConfig):
    """Knobs of AdaSpa-style block-sparse attention. Defaults: the paper's (sparsity 0.8, dense 10 of 50 steps,
    searches at the first sparse step and at 30 of 50, head-adaptive on, blocks of 64)."""

    method: Literal["sparse_attention"] = "sparse_attention"
    sparsity: float = Field(
        0.8, ge=0.0, lt=1.0,
        description="Base share of the non-text key blocks dropped per query row (0-1); text blocks are always kept.",
    )
    block_size: Literal[16, 32, 64, 128] = Field(64, description="Tokens per query/key block: 16, 32, 64 or 128.")
    dense_steps: float = Field(
        0.2, ge=0.0, description="Dense steps at the start: a count (integer >= 1) or a fraction of the steps (< 1)."
    )
    search_steps: list[float] | None = Field(
        None, description="Steps that search a new pattern, each a step index (>= 1) or a fraction (< 1); the "
        "first search starts sparsity (earlier steps run dense). Default: [dense_steps, 0.6].",
    )
    head_adaptive: bool = Field(True, description="Per-head budgets from recall (AdaSpa); off: every head at `sparsity`.")
    recall_threshold: float = Field(0.8, gt=0.0, lt=1.0, description="Recall over which a head counts as easy (paper: 0.8).")
    estimator: Literal["exact", "pooled"] = Field(
        "exact", description="exact: softmax mass per block (dense pass + LSE); pooled: mean-pooled q/k block scores."
    )
    layers: list[int] | None = Field(
        None, description="Blocks to sparsify, as indices in execution order over all stacks (default: all)."
    )
    backend: Literal["auto", "triton", "flex", "reference"] = Field(
        "auto", description="Kernel: auto (Triton on CUDA, compiled flex elsewhere), triton, flex, reference."
    )

    @field_validator("dense_steps")
    @classmethod
    def _count_or_fraction(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("a step count must be an integer (or a fraction < 1 of the steps)")
        return value

    @field_validator("search_steps")
    @classmethod
    def _steps_or_fractions(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            if not value:
                raise ValueError("give at least one search step (or leave it unset for the default)")
            for v in value:
                if v < 0 or (v >= 1 and v != int(v)):
                    raise ValueError(f"{v}: a search step is an integer step index or a fraction in [0, 1)")
        return value

    @field_validator("layers")
    @classmethod
    def _non_negative(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(v < 0 for v in value):
            raise ValueError("layer indices are >= 0")
        return value

    @model_validator(mode="after")
    def _searches_after_dense(self) -> "SparseAttentionConfig":
        if self.search_steps and self.dense_steps >= 1 and all(s >= 1 for s in self.search_steps):
            early = [s for s in self.search_steps if s < self.dense_steps]
            if early:
                raise ValueError(f"search_steps {early} fall in the dense steps (dense_steps={int(self.dense_steps)})")
        return self


@dataclass(frozen=True)
class Schedule:
    """The call's resolved schedule: sparse from `start` on (None: never), searches at `searches`."""

    start: int | None
    searches: frozenset[int]

    @classmethod
    def resolve(cls, config: SparseAttentionConfig, num_steps: int) -> "Schedule":
        dense = search.resolve_step(config.dense_steps, num_steps)
        wanted = config.search_steps if config.search_steps is not None else [dense, 0.6]
        steps = {search.resolve_step(s, num_steps) for s in wanted}
        steps = {s for s in steps if dense <= s < max(num_steps, 1)}
        return cls(start=min(steps) if steps else None, searches=frozenset(steps))

    def sparse(self, step: int) -> bool:
        return self.start is not None and step >= self.start


@dataclass
class SparseCounters(Counters):
    attention_blocks_computed: int = 0  # (query block, key block) pairs computed, over batch and heads
    attention_blocks_total: int = 0  # pairs a dense run computes
    searches: int = 0
    dense_searches: int = 0  # exact searches that ran a dense pass for the LSE
    lse_cached_searches: int = 0  # exact searches that reused the cached LSE
    search_seconds: float = 0.0
    search_steps: list[int] = field(default_factory=list)
    sparse_calls: int = 0
    dense_calls: int = 0  # calls run dense: before the first search, a first search's dense pass, and fallbacks
    dense_fallback_calls: int = 0  # sparse steps run dense because the layout leaves nothing to skip
    dense_fallback_reason: str = ""  # why, at the last such call


@dataclass
class LayerState:
    blocks: KVBlocks | None = None  # the last search's kept blocks, reused until the next search
    lse: torch.Tensor | None = None  # (B, H, L) float32, from the first exact search


class SparseState(BaseState):
    """Per CFG branch: each layer's masks and cached LSE."""

    def __init__(self) -> None:
        self.layers: dict[int, LayerState] = {}

    def reset(self) -> None:
        self.layers.clear()


class SparseRouter:
    """Stands in for `dispatch_attention_fn` inside one attention module's processor (`original` is set by the
    routing, see `accel/attention/routing.py`)."""

    def __init__(self, session: AccelSession, config: SparseAttentionConfig, state: StateManager, layer: int,
                 text_first: bool, counters: SparseCounters):
        self.session, self.config, self.state, self.layer = session, config, state, layer
        self.text_first, self.counters = text_first, counters
        self.original = None
        self.text_len = 0
        self._schedule: Schedule | None = None

    @property
    def schedule(self) -> Schedule:
        if self._schedule is None:
            plan = self.session.plan
            self._schedule = Schedule.resolve(self.config, plan.num_steps if plan is not None else 0)
        return self._schedule

    def __call__(self, query, key, value, attn_mask=None, *args, **kwargs):
        ctx = self.session.current
        plain = (
            attn_mask is None and not args and not kwargs.get("is_causal") and not kwargs.get("dropout_p")
            and kwargs.get("scale") is None and not kwargs.get("enable_gqa") and kwargs.get("parallel_config") is None
        )
        self_attention = plain and query.shape == key.shape and key.shape[:3] == value.shape[:3]
        if not self_attention or ctx is None:
            return self.original(query, key, value, attn_mask, *args, **kwargs)
        config, counters = self.config, self.counters
        b, length, h, _ = query.shape
        nb = num_blocks(length, config.block_size)
        full = b * h * nb * nb
        counters.attention_blocks_total += full
        if not self.schedule.sparse(ctx.step_index):
            return self._dense(full, query, key, value, attn_mask, *args, **kwargs)
        n_sink = min(search.sink_blocks(self.text_len, config.block_size), nb) if self.text_first else 0
        reason = search.dense_reason(nb, n_sink, config.sparsity, config.head_adaptive, h)
        if reason:
            counters.dense_fallback_calls += 1
            counters.dense_fallback_reason = reason
            return self._dense(full, query, key, value, attn_mask, *args, **kwargs)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, L, D)
        layer = self.state.get_state().layers.setdefault(self.layer, LayerState())
        out = None
        if ctx.step_index in self.schedule.searches or layer.blocks is None or layer.blocks.counts.shape != (b, h, nb):
            out = self._search(layer, q, k, v, ctx, n_sink)
        if out is None:
            out, _ = block_sparse_attention(q, k, v, layer.blocks, backend=config.backend, need_lse=False)
            counters.attention_blocks_computed += layer.blocks.kept
            counters.sparse_calls += 1
        else:
            counters.attention_blocks_computed += full
            counters.dense_calls += 1
        return out.transpose(1, 2).to(query.dtype)

    def _dense(self, full: int, *args, **kwargs):
        self.counters.attention_blocks_computed += full
        self.counters.dense_calls += 1
        return self.original(*args, **kwargs)

    @torch.compiler.disable
    def _search(self, layer: LayerState, q, k, v, ctx, n_sink: int) -> torch.Tensor | None:
        """New kept blocks for this layer and branch; returns the dense output when the search computed one."""
        config, bs = self.config, self.config.block_size
        start = time.perf_counter()
        out = None
        if config.estimator == "pooled":
            weights = search.pooled_importance(q, k, bs)
        else:
            cached = layer.lse if layer.lse is not None and layer.lse.shape == q.shape[:3] else None
            weights, out, lse = search.exact_importance(q, k, v, bs, config.backend, cached)
            if cached is None:
                layer.lse = lse
                self.counters.dense_searches += 1
            else:
                self.counters.lse_cached_searches += 1
        sparsity, _ = search.head_sparsities(weights, config.sparsity, n_sink, config.head_adaptive,
                                             config.recall_threshold)
        layer.blocks = KVBlocks.from_mask(search.select_blocks(weights, sparsity, n_sink), q.shape[2], bs)
        if resolve_backend(config.backend, q.device) == "flex":
            layer.blocks.flex_block_mask()  # built here, once per search, not in the next sparse call
        if q.is_cuda:  # time the search's kernels, not their launch
            torch.cuda.synchronize(q.device)
        self.counters.searches += 1
        self.counters.search_seconds += time.perf_counter() - start
        if ctx.step_index not in self.counters.search_steps:
            self.counters.search_steps.append(ctx.step_index)
        return out


class SparseAttentionBlockHook(AttentionRoutingHook):
    """On a block: routes its self-attention through the router for the call, reads the block's text length."""

    def __init__(self, session: AccelSession, attention: torch.nn.Module, router: SparseRouter):
        super().__init__(attention, router)
        self.session = session

    def pre_forward(self, module, *args, **kwargs):
        if self.router.text_first:
            encoder = self.session.block_io(module).inputs(args, kwargs)[1]
            self.router.text_len = int(encoder.shape[1]) if encoder is not None else 0
        return args, kwargs


def apply_sparse_attention(session: AccelSession, config: SparseAttentionConfig) -> MethodHandle:
    adapter = session.adapter
    if adapter.self_attention is None:  # pragma: no cover - the Method's families guard this first
        raise UnsupportedModelError(f"sparse_attention: no self-attention known for the {adapter.family} family")
    blocks = list(session.blocks())
    chosen = set(range(len(blocks))) if config.layers is None else set(config.layers)
    if config.layers is not None and max(chosen) >= len(blocks):
        raise UnsupportedModelError(f"sparse_attention: layers go up to {len(blocks) - 1} for this model, got {max(chosen)}")
    counters = SparseCounters()
    state = session.branch_state(SparseState)
    for layer, (_, _, block) in enumerate(blocks):
        if layer not in chosen:
            continue
        attention = getattr(block, adapter.self_attention)
        router = SparseRouter(session, config, state, layer, adapter.text_first, counters)
        session.add_hook(block, SparseAttentionBlockHook(session, attention, router), SPARSE_HOOK)
    return MethodHandle(counters)


SPARSE_ATTENTION = Method(
    "sparse_attention", SparseAttentionConfig, apply_sparse_attention,
    "AdaSpa: block-sparse attention with per-head pattern search reused across steps (arXiv 2502.21079)",
    families=tuple(adapter.family for adapter in ADAPTERS.values() if adapter.self_attention is not None),
)
