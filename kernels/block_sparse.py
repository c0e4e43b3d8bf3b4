"""Block-sparse attention and block importance: the public entry points, the plain-torch reference and the
FlexAttention backend. The Triton backend lives in `kernels/triton_block_sparse.py` (imported only when used).

Conventions (every backend):
- q, k, v: (B, H, L, D), same L for queries and keys (self-attention); scale 1/sqrt(D).
- The kept blocks, in one of two forms:
  - kv_block_mask: bool (B, H, nb, nb) with nb = ceil(L / block_size); entry [b, h, i, j] keeps key block j for
    query block i;
  - `KVBlocks`: the same as index lists (per row a count and the kept key blocks), built once per mask. A caller
    that reuses a mask across calls (AdaSpa reuses it for many steps) builds it once, so a call neither sorts nor
    waits on the device.
  The last block may be ragged (L % block_size tokens): its missing tokens do not exist, they are never attended
  and never produce output.
- Returns (out, lse): out (B, H, L, D) in q's dtype; lse (B, H, L) float32, the natural-log log-sum-exp of the
  scaled scores over the kept keys of each row (-inf and out = 0 for a row that keeps no block).

Backend choice ("auto"): Triton on CUDA when triton imports, compiled FlexAttention elsewhere; the reference
only when asked (it materialises scores chunk by chunk: for tests and small inputs).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Backend = Literal["auto", "triton", "flex", "reference"]
BACKENDS = ("auto", "triton", "flex", "reference")
_REFERENCE_ROWS = 1024  # query rows per chunk in the reference (bounds its memory to chunk x L scores)


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: "torch.Tensor | KVBlocks", block_size: int):
    if q.dim() != 4 or q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k, v must be (B, H, L, D) with equal shapes, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, length, _ = q.shape
    nb = num_blocks(length, block_size)
    if isinstance(blocks, KVBlocks):
        if blocks.block_size != block_size or blocks.length != length or tuple(blocks.counts.shape) != (b, h, nb):
            raise ValueError(
                f"kv blocks must cover {(b, h, nb)} blocks of {block_size} over {length} tokens, got "
                f"{tuple(blocks.counts.shape)} blocks of {blocks.block_size} over {blocks.length}"
            )
    elif blocks.dtype != torch.bool or tuple(blocks.shape) != (b, h, nb, nb):
        raise ValueError(
            f"kv_block_mask must be bool of shape {(b, h, nb, nb)}, got {blocks.dtype} {tuple(blocks.shape)}"
        )


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


@dataclass(eq=False)
class KVBlocks:
    """The kept key blocks as index lists: what the kernels iterate over (FlexAttention's `BlockMask` is built
    from the same lists). `from_mask` sorts once and reads two numbers from the device once; every call that
    reuses it then does neither, and the flex `BlockMask` is built once and kept here.

    counts (B, H, nb) int32: kept key blocks per query block; indices (B, H, nb, width) int32: each row's kept
    key blocks first, in increasing order (entries past its count are unused), width = the largest count (at
    least 1); kept: the sum of counts, i.e. the (query block, key block) pairs one call computes."""

    counts: torch.Tensor
    indices: torch.Tensor
    length: int
    block_size: int
    kept: int
    _flex: Any = field(default=None, repr=False)

    @classmethod
    def from_mask(cls, kv_block_mask: torch.Tensor, length: int, block_size: int) -> "KVBlocks":
        counts, indices = mask_to_kv_blocks(kv_block_mask)
        kept, width = torch.stack((counts.sum(dtype=torch.int64), counts.amax().long())).tolist()
        return cls(counts, indices[..., : max(1, width)].contiguous(), length, block_size, kept)

    @classmethod
    def full(cls, b: int, h: int, length: int, block_size: int, device: torch.device) -> "KVBlocks":
        """Every block kept (a dense pass), without sorting."""
        nb = num_blocks(length, block_size)
        counts = torch.full((b, h, nb), nb, dtype=torch.int32, device=device)
        indices = torch.arange(nb, dtype=torch.int32, device=device).expand(b, h, nb, nb).contiguous()
        return cls(counts, indices, length, block_size, b * h * nb * nb)

    def to_mask(self) -> torch.Tensor:
        """The bool (B, H, nb, nb) mask (for the reference and the CPU LSE; no device sync)."""
        nb = self.counts.shape[-1]
        used = torch.arange(self.indices.shape[-1], device=self.indices.device) < self.counts[..., None]
        columns = torch.where(used, self.indices, nb).long()  # unused entries land in an extra column, dropped
        mask = torch.zeros(*self.counts.shape, nb + 1, dtype=torch.bool, device=self.counts.device)
        return mask.scatter_(-1, columns, True)[..., :nb]

    def flex_block_mask(self):
        """The FlexAttention `BlockMask`, built on first use and kept. Its index lists span every key block (flex
        reads the key-block count from their width); forward only (no transposed q-side lists). With a ragged
        last block a mask_mod hides its missing key tokens. (Passing the kept blocks as "full" blocks instead
        fails to compile on CPU in torch 2.13: the C++ template references an undeclared `kv_indices`.)"""
        if self._flex is None:
            from torch.nn.attention.flex_attention import BlockMask

            nb = self.counts.shape[-1]
            indices = torch.nn.functional.pad(self.indices, (0, nb - self.indices.shape[-1]))
            mask_mod = _tail_mask_mod(self.length) if self.length % self.block_size else None
            self._flex = BlockMask.from_kv_blocks(
                self.counts, indices, BLOCK_SIZE=self.block_size, mask_mod=mask_mod,
                seq_lengths=(self.length, self.length), compute_q_blocks=False,
            )
        return self._flex


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


def flex_attention_blocks(q, k, v, blocks: KVBlocks, need_lse: bool = True):
    """Compiled FlexAttention over the kept blocks. Compiled flex on CPU cannot return the LSE (torch 2.13:
    "return_lse is not supported yet"), so on CPU the LSE, when asked for, comes from a chunked torch pass."""
    _check(q, k, v, blocks, blocks.block_size)
    flex = compiled_flex_attention()
    options = {"BLOCK_M": blocks.block_size, "BLOCK_N": blocks.block_size}
    if q.device.type == "cpu":
        out = flex(q, k, v, block_mask=blocks.flex_block_mask(), kernel_options=options)
        lse = _masked_lse(q, k, blocks.to_mask(), blocks.block_size) if need_lse else None
        return out, lse
    out, lse = flex(q, k, v, block_mask=blocks.flex_block_mask(), return_lse=True, kernel_options=options)
    return out, lse.float()


# -- public API ----------------------------------------------------------------------------------------------------
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_blocks: torch.Tensor | KVBlocks,
    block_size: int | None = None,
    backend: Backend = "auto",
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of q over the kept key blocks of each (batch, head, query block): (out, lse).

    `kv_blocks`: a bool mask (converted for this call) or a `KVBlocks` (used as is; `block_size` defaults to its
    own, else 64). `need_lse=False` lets a backend skip the LSE (returns None) where it costs extra (compiled flex
    on CPU)."""
    if block_size is None:
        block_size = kv_blocks.block_size if isinstance(kv_blocks, KVBlocks) else 64
    _check(q, k, v, kv_blocks, block_size)
    chosen = resolve_backend(backend, q.device)
    if chosen == "reference":
        mask = kv_blocks.to_mask() if isinstance(kv_blocks, KVBlocks) else kv_blocks
        return reference_attention(q, k, v, mask, block_size)
    if not isinstance(kv_blocks, KVBlocks):
        kv_blocks = KVBlocks.from_mask(kv_blocks, q.shape[2], block_size)
    if chosen == "flex":
        return flex_attention_blocks(q, k, v, kv_blocks, need_lse=need_lse)
    from kernels import triton_block_sparse

    return triton_block_sparse.attention(q, k, v, kv_blocks)


def dense_attention_with_lse(q, k, v, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention and its LSE in one pass: the first (dense) search pass. Triton: the block-sparse kernel
    with every block kept; CPU: ATen's flash attention for CPU (returns the LSE); else the reference."""
    chosen = resolve_backend(backend, q.device)
    if chosen == "flex" and q.device.type == "cpu":
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
            return out, lse.float()
        except (RuntimeError, AttributeError):  # pragma: no cover - op missing in an older torch
            pass
    b, h, length, _ = q.shape
    return block_sparse_attention(q, k, v, KVBlocks.full(b, h, length, 64, q.device), backend=chosen)


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
