"""Block-sparse attention and block importance: the public entry points, the plain-torch reference and the
FlexAttention backend. The Triton backend lives in `kernels/triton_block_sparse.py` (imported only when used).

Conventions (every backend):
- q, k, v: (B, H, L, D), same L for queries and keys (self-attention); scale 1/sqrt(D).
- kv_block_mask: bool (B, H, nb, nb) with nb = ceil(L / block_size); entry [b, h, i, j] keeps key block j for
  query block i. The last block may be ragged (L % block_size tokens): its missing tokens do not exist, they are
  never attended and never produce output.
- Returns (out, lse): out (B, H, L, D) in q's dtype; lse (B, H, L) float32, the natural-log log-sum-exp of the
  scaled scores over the kept keys of each row (-inf and out = 0 for a row that keeps no block).

Backend choice ("auto"): Triton on CUDA when triton imports, compiled FlexAttention elsewhere; the reference
only when asked (it materialises scores chunk by chunk: for tests and small inputs).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

Backend = Literal["auto", "triton", "flex", "reference"]
BACKENDS = ("auto", "triton", "flex", "reference")
_REFERENCE_ROWS = 1024  # query rows per chunk in the reference (bounds its memory to chunk x L scores)


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, block_size: int) -> None:
    if q.dim() != 4 or q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k, v must be (B, H, L, D) with equal shapes, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, length, _ = q.shape
    nb = num_blocks(length, block_size)
    if mask.dtype != torch.bool or tuple(mask.shape) != (b, h, nb, nb):
        raise ValueError(f"kv_block_mask must be bool of shape {(b, h, nb, nb)}, got {mask.dtype} {tuple(mask.shape)}")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and triton_available():
        return "triton"
    return "flex"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def mask_to_kv_blocks(kv_block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks, kv_indices), int32: per row the count of kept key blocks and their indices first (in
    increasing order: a stable descending argsort of the bool mask), as `BlockMask.from_kv_blocks` takes them."""
    counts = kv_block_mask.sum(-1, dtype=torch.int32)
    indices = torch.argsort(kv_block_mask.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), indices.contiguous()


# -- reference ---------------------------------------------------------------------------------------------------
def reference_attention(q, k, v, kv_block_mask, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense scores with the mask applied, in float32, chunked over query rows."""
    _check(q, k, v, kv_block_mask, block_size)
    length, scale = q.shape[2], 1.0 / math.sqrt(q.shape[-1])
    kf, vf = k.float(), v.float()
    outs, lses = [], []
    rows = max(block_size, (_REFERENCE_ROWS // block_size) * block_size)
    for start in range(0, length, rows):
        stop = min(length, start + rows)
        scores = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * scale
        keep = kv_block_mask[:, :, start // block_size : num_blocks(stop, block_size)]
        keep = keep.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)
        keep = keep[:, :, : stop - start, :length]  # chunks start on block boundaries (rows % block_size == 0)
        scores = scores.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
        probs = torch.nan_to_num(probs, nan=0.0)
        outs.append(torch.matmul(probs, vf))
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def reference_importance(q, k, lse, block_size: int = 64) -> torch.Tensor:
    """W[b, h, i, j] = sum over query tokens of block i and key tokens of block j of exp(q.k * scale - lse_q):
    the softmax mass of each block (float32, (B, H, nb, nb)). Chunked over query blocks."""
    b, h, length, d = q.shape
    nb, scale = num_blocks(length, block_size), 1.0 / math.sqrt(d)
    pad = nb * block_size - length
    kf = k.float()
    out = torch.empty(b, h, nb, nb, dtype=torch.float32, device=q.device)
    rows = max(block_size, (_REFERENCE_ROWS // block_size) * block_size)
    for start in range(0, length, rows):
        stop = min(length, start + rows)
        scores = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * scale
        probs = torch.exp(scores - lse[:, :, start:stop, None].float())
        probs = torch.nn.functional.pad(probs, (0, pad, 0, num_blocks(stop - start, block_size) * block_size - (stop - start)))
        probs = probs.unflatten(-1, (nb, block_size)).sum(-1)  # (B, H, rows, nb)
        probs = probs.unflatten(-2, (-1, block_size)).sum(-2)  # (B, H, row blocks, nb)
        out[:, :, start // block_size : start // block_size + probs.shape[2]] = probs
    return out


def dense_lse(q, k, block_size: int = 64) -> torch.Tensor:
    """Log-sum-exp of the dense scaled scores per row, float32 (B, H, L), chunked."""
    length, scale = q.shape[2], 1.0 / math.sqrt(q.shape[-1])
    kf = k.float()
    rows = max(block_size, (_REFERENCE_ROWS // block_size) * block_size)
    return torch.cat(
        [torch.logsumexp(torch.matmul(q[:, :, s : s + rows].float(), kf.transpose(-1, -2)) * scale, dim=-1)
         for s in range(0, length, rows)],
        dim=2,
    )


def _masked_lse(q, k, kv_block_mask, block_size: int) -> torch.Tensor:
    length, scale = q.shape[2], 1.0 / math.sqrt(q.shape[-1])
    kf = k.float()
    rows = max(block_size, (_REFERENCE_ROWS // block_size) * block_size)
    parts = []
    for start in range(0, length, rows):
        stop = min(length, start + rows)
        scores = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * scale
        keep = kv_block_mask[:, :, start // block_size : num_blocks(stop, block_size)]
        keep = keep.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[:, :, : stop - start, :length]
        parts.append(torch.logsumexp(scores.masked_fill(~keep, float("-inf")), dim=-1))
    return torch.cat(parts, dim=2)


# -- FlexAttention -------------------------------------------------------------------------------------------------
_COMPILED_FLEX = None


def compiled_flex_attention():
    """`torch.compile(flex_attention)`, built once per process (the first compile on CPU takes ~15 s, each new
    shape a few seconds more)."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


@functools.lru_cache(maxsize=64)
def _tail_mask_mod(length: int):
    """One function object per length, so the compiled flex sees the same mask_mod again (no recompiles)."""

    def in_range(b, h, q_idx, kv_idx):
        return kv_idx < length

    return in_range


def flex_block_mask(kv_block_mask: torch.Tensor, length: int, block_size: int):
    """A `BlockMask` from the kept blocks (`from_kv_blocks`); with a ragged last block, a mask_mod hides its
    missing key tokens. (Passing the kept blocks as "full" blocks instead fails to compile on CPU in torch 2.13:
    the C++ template references an undeclared `kv_indices`.)"""
    from torch.nn.attention.flex_attention import BlockMask

    counts, indices = mask_to_kv_blocks(kv_block_mask)
    mask_mod = _tail_mask_mod(length) if length % block_size else None
    return BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(length, length))


def flex_attention_blocks(q, k, v, kv_block_mask, block_size: int = 64, need_lse: bool = True):
    """Compiled FlexAttention over the kept blocks. Compiled flex on CPU cannot return the LSE (torch 2.13:
    "return_lse is not supported yet"), so on CPU the LSE, when asked for, comes from a chunked torch pass."""
    _check(q, k, v, kv_block_mask, block_size)
    length = q.shape[2]
    block_mask = flex_block_mask(kv_block_mask, length, block_size)
    flex = compiled_flex_attention()
    options = {"BLOCK_M": block_size, "BLOCK_N": block_size}
    if q.device.type == "cpu":
        out = flex(q, k, v, block_mask=block_mask, kernel_options=options)
        lse = _masked_lse(q, k, kv_block_mask, block_size) if need_lse else None
        return out, lse
    out, lse = flex(q, k, v, block_mask=block_mask, return_lse=True, kernel_options=options)
    return out, lse.float()


# -- public API ----------------------------------------------------------------------------------------------------
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_mask: torch.Tensor,
    block_size: int = 64,
    backend: Backend = "auto",
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of q over the kept key blocks of each (batch, head, query block): (out, lse).

    `need_lse=False` lets a backend skip the LSE (returns None) where it costs extra (compiled flex on CPU)."""
    _check(q, k, v, kv_block_mask, block_size)
    chosen = resolve_backend(backend, q.device)
    if chosen == "reference":
        return reference_attention(q, k, v, kv_block_mask, block_size)
    if chosen == "flex":
        return flex_attention_blocks(q, k, v, kv_block_mask, block_size, need_lse=need_lse)
    from kernels import triton_block_sparse

    return triton_block_sparse.attention(q, k, v, kv_block_mask, block_size)


def dense_attention_with_lse(q, k, v, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention and its LSE in one pass: the first (dense) search pass. Triton: the block-sparse kernel
    with every block kept; CPU: ATen's flash attention for CPU (returns the LSE); else the reference."""
    chosen = resolve_backend(backend, q.device)
    b, h, length, _ = q.shape
    if chosen == "triton":
        block = 64
        nb = num_blocks(length, block)
        full = torch.ones(b, h, nb, nb, dtype=torch.bool, device=q.device)
        return block_sparse_attention(q, k, v, full, block, backend="triton")
    if chosen == "flex" and q.device.type == "cpu":
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
            return out, lse.float()
        except (RuntimeError, AttributeError):  # pragma: no cover - op missing in an older torch
            pass
    block = 64
    nb = num_blocks(length, block)
    full = torch.ones(b, h, nb, nb, dtype=torch.bool, device=q.device)
    return block_sparse_attention(q, k, v, full, block, backend="flex" if chosen == "flex" else "reference")


def block_importance(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_size: int = 64, backend: Backend = "auto"
) -> torch.Tensor:
    """Softmax mass per block, W[b, h, i, j] = sum_{r in block i, c in block j} exp(q_r.k_c / sqrt(D) - lse_r),
    float32 (B, H, nb, nb). With the row's exact LSE each query row sums to 1 over all key blocks; with an LSE
    cached from an earlier step it is the same measure up to the drift of the normaliser."""
    chosen = resolve_backend(backend, q.device)
    if chosen == "triton":
        from kernels import triton_block_sparse

        return triton_block_sparse.importance(q, k, lse, block_size)
    return reference_importance(q, k, lse, block_size)  # flex has no per-block reduction: torch does it
