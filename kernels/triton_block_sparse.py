"""Triton kernels: FlashAttention-2 style block-sparse forward, and the block-importance search.

Forward: one program per (query block, batch*head). It loads its query block once, then iterates only over the
kept key blocks of its row (`indices[b, h, i, :counts[b, h, i]]` of a `KVBlocks`, the layout of FlexAttention's
BlockMask, rows `width` entries apart), with the online softmax (running max m, running sum l, rescaled
accumulator), and writes out and the LSE (natural log). The ragged last block is masked on load (rows and
columns past L) and in the scores (-inf).

Importance: one program per (query block, batch*head), looping over every key block: the sum of
exp(q.k * scale - lse) over the tile, one float per (query block, key block).

Runs on CUDA; on CPU with TRITON_INTERPRET=1 (set before this module is imported) for tests. Block sizes
16/32/64/128; head dims are padded to a power of two >= 16 on load.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.block_sparse import KVBlocks, _check, num_blocks


@triton.jit
def _load_rows(base, stride_l, offs, ok, offs_d, d_ok):
    """Rows ``offs`` (all ``DP`` padded columns) of one (batch, head) slice starting at ``base``; zeros outside."""
    return tl.load(base + offs[:, None] * stride_l + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _query_tile(H, L, BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """This program's query block and (batch, head), its row offsets and the padded head-dim offsets, with masks."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, DP)
    return qb, bh, bh // H, bh % H, offs_m, offs_m < L, tl.arange(0, BLOCK), offs_d, offs_d < D


@triton.jit
def _block_sparse_fwd(
    Q, K, V, O, LSE, KV_NUM, KV_IDX,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    H, L, NB, WIDTH, scale,
    BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
):
    qb, bh, b, h, offs_m, m_ok, offs_n0, offs_d, d_ok = _query_tile(H, L, BLOCK, D, DP)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, stride_ql, offs_m, m_ok, offs_d, d_ok)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, DP], dtype=tl.float32)
    row = bh * NB + qb
    count = tl.load(KV_NUM + row)
    for j in range(0, count):
        kb = tl.load(KV_IDX + row * WIDTH + j)
        offs_n = kb * BLOCK + offs_n0
        n_ok = offs_n < L
        k = _load_rows(K + b * stride_kb + h * stride_kh, stride_kl, offs_n, n_ok, offs_d, d_ok)
        v = _load_rows(V + b * stride_vb + h * stride_vh, stride_vl, offs_n, n_ok, offs_d, d_ok)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(safe_l), float("-inf"))
    tl.store(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
        out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + bh * L + offs_m, lse, mask=m_ok)


@triton.jit
def _block_importance(
    Q, K, LSE, W,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    H, L, NB, scale,
    BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
):
    qb, bh, b, h, offs_m, m_ok, offs_n0, offs_d, d_ok = _query_tile(H, L, BLOCK, D, DP)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, stride_ql, offs_m, m_ok, offs_d, d_ok)
    lse = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=float("inf"))
    for kb in range(0, NB):
        offs_n = kb * BLOCK + offs_n0
        n_ok = offs_n < L
        k = _load_rows(K + b * stride_kb + h * stride_kh, stride_kl, offs_n, n_ok, offs_d, d_ok)
        s = tl.dot(q, tl.trans(k)) * scale
        p = tl.exp(s - lse[:, None])
        p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
        tl.store(W + (bh * NB + qb) * NB + kb, tl.sum(tl.sum(p, 1), 0))


def _padded_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _last_dim_contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def attention(q, k, v, blocks: KVBlocks) -> tuple[torch.Tensor, torch.Tensor]:
    block_size = blocks.block_size
    _check(q, k, v, blocks, block_size)
    q, k, v = _last_dim_contiguous(q, k, v)
    b, h, length, d = q.shape
    nb = num_blocks(length, block_size)
    counts, indices = blocks.counts, blocks.indices
    out = torch.empty_like(q)
    lse = torch.empty(b, h, length, dtype=torch.float32, device=q.device)
    _block_sparse_fwd[(nb, b * h)](
        q, k, v, out, lse, counts, indices,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, length, nb, indices.shape[-1], 1.0 / math.sqrt(d),
        BLOCK=block_size, D=d, DP=_padded_dim(d),
    )
    return out, lse


def importance(q, k, lse, block_size: int = 64) -> torch.Tensor:
    q, k = _last_dim_contiguous(q, k)
    b, h, length, d = q.shape
    nb = num_blocks(length, block_size)
    lse = lse.float().contiguous()
    weights = torch.empty(b, h, nb, nb, dtype=torch.float32, device=q.device)
    _block_importance[(nb, b * h)](
        q, k, lse, weights,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        h, length, nb, 1.0 / math.sqrt(d),
        BLOCK=block_size, D=d, DP=_padded_dim(d),
    )
    return weights
