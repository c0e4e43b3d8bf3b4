"""Attention kernels, each with a plain-torch reference (see DESIGN.md: this layer imports torch and, optionally,
triton; never diffusers, accel or server).

- `block_sparse_attention(q, k, v, kv_blocks, block_size=None, backend="auto")` -> (out, lse): attention over
  the kept key blocks only, given as a bool block mask or as `KVBlocks` (index lists built once per mask, for
  callers that reuse a mask across calls); backends "triton" (GPU; CPU under TRITON_INTERPRET=1), "flex" (compiled
  FlexAttention, portable), "reference" (plain torch, for tests).
- `block_importance(q, k, lse, block_size=64)`: the softmax mass of every (query block, key block), the search
  measure of AdaSpa.
"""

from kernels.block_sparse import (
    BACKENDS,
    KVBlocks,
    block_importance,
    block_sparse_attention,
    dense_attention_with_lse,
    dense_lse,
    mask_to_kv_blocks,
    num_blocks,
    reference_attention,
    reference_importance,
    resolve_backend,
)

__all__ = [
    "BACKENDS",
    "KVBlocks",
    "block_importance",
    "block_sparse_attention",
    "dense_attention_with_lse",
    "dense_lse",
    "mask_to_kv_blocks",
    "num_blocks",
    "reference_attention",
    "reference_importance",
    "resolve_backend",
]
