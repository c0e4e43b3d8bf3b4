"""AdaSpa's block pattern search: block importance, sink, head-adaptive budgets, top-k block masks.

Everything here works on one attention call's tensors in the kernels' layout, (B, H, L, D), and returns per
(batch, head) masks (B, H, nb, nb), nb = ceil(L / block_size). No hooks, no state: `sparse.py` owns those.

- Importance W[b, h, i, j]: the softmax mass of query block i on key block j.
  exact: `kernels.block_importance(q, k, lse)` = sum exp(q.k/sqrt(D) - lse); with the LSE of a dense pass at the
  first search (two passes: dense with LSE, then importance), with the LSE cached from it at later searches (one
  pass). pooled: softmax over key blocks of (mean-pooled q block) . (mean-pooled k block) / sqrt(D) + log(tokens
  in the key block), times the tokens in the query block (no dense pass; ProxyAttn-style pooled scores).
- Sink: with `text_len` text tokens first in the sequence, the first ceil(text_len / block_size) blocks hold text
  (the block straddling the text/image boundary counts as text). Those query blocks keep every key block
  (text->all), and every query block keeps those key blocks (all->text).
- Budget (over the non-sink blocks, as in the paper): a non-sink query row of a head at sparsity s keeps the
  sink blocks, then k = round((1 - s) * n_rest) of the n_rest = nb - sink other key blocks by importance (ties:
  lower index), at least 1 when n_rest > 0. Counting the sink in the budget instead would starve long-text
  layouts: FLUX at 1024x1024 has 8 text blocks of 72, and round(0.2 * 72) = 14 would leave 6 of 64 image blocks
  at s = 0.8, none at all for a head promoted to 0.9.
- Head-adaptive (AdaSpa): recall of a head at base sparsity s = the mass its kept blocks hold over the mass of its
  non-sink rows. With n heads (per batch item) over `recall_threshold`, n <= H // 2, the n best heads get
  (1 + s) / 2, the n worst get (3s - 1) / 2, the others s: the average stays s. For s < 1/3, where (3s - 1) / 2
  would be negative, the shift is limited to s (best: 2s, worst: 0), so the average still stays s. Every head's
  budget is over the same non-sink blocks. Sparsities are float64, so the budget of a Python float (the
  nothing-to-skip rule) and of a tensor round alike.
- Nothing to skip: fewer than 3 blocks, or a layout where even the sparsest head keeps every non-sink block
  (`dense_reason`); the caller then runs dense and searches nothing.
"""

from __future__ import annotations

import math

import torch

from kernels import block_importance, dense_attention_with_lse, num_blocks


def resolve_step(value: float, num_steps: int) -> int:
    """A step given as an index (>= 1) or as a fraction of the steps (< 1)."""
    return int(value) if value >= 1 else int(round(value * num_steps))


def sink_blocks(text_len: int, block_size: int) -> int:
    return -(-text_len // block_size) if text_len > 0 else 0


def exact_importance(q, k, v, block_size: int, backend: str, lse: torch.Tensor | None):
    """(W, dense output or None, lse). Without an LSE: a dense pass with LSE first (its output is this step's
    attention output), then the importance pass; with a cached LSE: the importance pass only."""
    out = None
    if lse is None:
        out, lse = dense_attention_with_lse(q, k, v, backend=backend)
    return block_importance(q, k, lse, block_size, backend=backend), out, lse


def pooled_importance(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    b, h, length, d = q.shape
    nb = num_blocks(length, block_size)
    pad = nb * block_size - length
    sizes = torch.full((nb,), float(block_size), device=q.device)
    sizes[-1] = length - (nb - 1) * block_size

    def pool(x):
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).unflatten(2, (nb, block_size)).sum(3)
        return x / sizes[:, None]

    logits = pool(q) @ pool(k).transpose(-1, -2) / math.sqrt(d) + sizes.log()
    return torch.softmax(logits, dim=-1) * sizes[:, None]


def budget(sparsity: float, n_rest: int) -> int:
    """Non-sink key blocks a non-sink query row keeps at `sparsity` (the scalar form of `budgets`)."""
    return min(n_rest, max(min(1, n_rest), round((1.0 - sparsity) * n_rest)))


def budgets(sparsity: torch.Tensor, nb: int, n_sink: int) -> torch.Tensor:
    """Non-sink key blocks kept per non-sink query row, per head (int64, same shape as `sparsity`), on top of the
    `n_sink` sink blocks every row keeps."""
    n_rest = nb - n_sink
    k = torch.round((1.0 - sparsity.double()) * n_rest).long()
    return k.clamp(min=min(1, n_rest), max=n_rest)


def adaptive_levels(base: float) -> tuple[float, float]:
    """(promoted, demoted) sparsity of the head-adaptive budgets around `base`."""
    delta = min((1.0 - base) / 2.0, base)  # paper: +-(1 - s)/2; limited so that (3s - 1)/2 never clips below 0
    return base + delta, base - delta


def dense_reason(nb: int, n_sink: int, sparsity: float, adaptive: bool, heads: int) -> str:
    """Why a layout has nothing to skip ("" when some non-sink key block can be dropped): fewer than 3 blocks, or
    even the sparsest head (promoted, when head-adaptive) keeps every non-sink block."""
    if nb < 3:
        return f"{nb} block(s): fewer than 3"
    sparsest = adaptive_levels(sparsity)[0] if adaptive and heads >= 2 else sparsity
    n_rest = nb - n_sink
    if budget(sparsest, n_rest) >= n_rest:
        return f"no key block to drop: {n_rest} non-sink of {nb} blocks, all kept at sparsity {sparsest:g}"
    return ""


def select_blocks(weights: torch.Tensor, sparsity: torch.Tensor, n_sink: int) -> torch.Tensor:
    """Top-k block mask: (B, H, nb, nb) bool from importance (B, H, nb, nb) and per-head sparsity (B, H). Sink
    columns rank first, so a row keeps them plus the budget's top non-sink blocks."""
    nb = weights.shape[-1]
    scores = weights.float().clone()
    scores[..., :n_sink] = float("inf")
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(nb, device=order.device).expand_as(order))
    mask = ranks < (n_sink + budgets(sparsity, nb, n_sink))[..., None, None]
    mask[:, :, :n_sink, :] = True
    return mask


def recall(weights: torch.Tensor, mask: torch.Tensor, n_sink: int) -> torch.Tensor:
    """Share of the attention mass the kept blocks hold, per (batch, head), over the non-sink query rows."""
    rows = slice(n_sink, None) if n_sink < weights.shape[-2] else slice(None)
    w = weights[:, :, rows].float()
    return (w * mask[:, :, rows]).sum((-1, -2)) / w.sum((-1, -2)).clamp_min(1e-30)


def head_sparsities(weights: torch.Tensor, base: float, n_sink: int, adaptive: bool, threshold: float = 0.8):
    """Per-head sparsity (B, H) float64, and the recall at the base sparsity (B, H)."""
    b, h = weights.shape[:2]
    base_s = torch.full((b, h), float(base), dtype=torch.float64, device=weights.device)
    head_recall = recall(weights, select_blocks(weights, base_s, n_sink), n_sink)
    if not adaptive or h < 2:
        return base_s, head_recall
    out = base_s.clone()
    high, low = adaptive_levels(base)
    order = torch.argsort(head_recall, dim=-1, descending=True, stable=True)
    for item in range(b):
        n = min(int((head_recall[item] > threshold).sum()), h // 2)
        if n:
            out[item, order[item, :n]] = high
            out[item, order[item, h - n :]] = low
    return out, head_recall
