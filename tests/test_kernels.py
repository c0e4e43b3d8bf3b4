"""kernels/: every backend of block_sparse_attention agrees with the reference (random masks, ragged lengths, fp32),
all blocks kept equals dense attention, and the block-importance search matches its torch reference.

The Triton kernels run on CPU under TRITON_INTERPRET=1, which must be set before triton is first imported (and
diffusers imports triton): `test_triton_kernels_under_interpreter` runs the `triton_case` tests of this file in a
child pytest with the variable set. Compiled FlexAttention cases are few and small (a new shape recompiles).
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import (
    KVBlocks,
    block_importance,
    block_sparse_attention,
    dense_lse,
    mask_to_kv_blocks,
    reference_attention,
)
from kernels.block_sparse import reference_importance, resolve_backend, triton_available

CHILD = os.environ.get("ACCEL_TRITON_CHILD") == "1"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
in_child = pytest.mark.skipif(not CHILD, reason="runs in the TRITON_INTERPRET=1 child (test_triton_kernels_under_interpreter)")


def _inputs(b, h, length, d, block, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g) for _ in range(3))
    nb = -(-length // block)
    mask = torch.rand(b, h, nb, nb, generator=g) < density
    mask[..., torch.arange(nb), torch.arange(nb)] = True  # every row keeps at least its diagonal block
    return q, k, v, mask


def _dense(q, k, v):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return F.scaled_dot_product_attention(q, k, v), torch.logsumexp(scores, -1)


def test_reference_all_blocks_equals_dense_sdpa():
    q, k, v, _ = _inputs(2, 3, 100, 16, 32, 1.0)
    mask = torch.ones(2, 3, 4, 4, dtype=torch.bool)
    out, lse = reference_attention(q, k, v, mask, 32)
    dense, dense_l = _dense(q, k, v)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, dense_l, atol=1e-5, rtol=1e-5)


def test_reference_masks_exactly_the_dropped_blocks():
    """Brute force per row: softmax over the kept keys only."""
    q, k, v, mask = _inputs(1, 2, 45, 8, 16, 0.4, seed=3)
    out, lse = reference_attention(q, k, v, mask, 16)
    for h in range(2):
        for r in range(45):
            keys = [c for c in range(45) if mask[0, h, r // 16, c // 16]]
            s = q[0, h, r] @ k[0, h, keys].T / math.sqrt(8)
            torch.testing.assert_close(out[0, h, r], torch.softmax(s, 0) @ v[0, h, keys], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse[0, h, r], torch.logsumexp(s, 0), atol=1e-5, rtol=1e-5)


def test_importance_reference_rows_sum_to_block_sizes_with_exact_lse():
    q, k, _, _ = _inputs(1, 2, 70, 16, 32, 1.0)
    w = reference_importance(q, k, dense_lse(q, k, 32), 32)
    torch.testing.assert_close(w.sum(-1), torch.tensor([32.0, 32.0, 6.0]).expand(1, 2, 3), atol=1e-4, rtol=1e-5)
    # brute force one block
    p = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)
    torch.testing.assert_close(w[0, 1, 2, 1], p[0, 1, 64:70, 32:64].sum(), atol=1e-5, rtol=1e-5)


def test_kv_blocks_layout():
    mask = torch.tensor([[[[True, False, True], [False, False, True], [True, True, True]]]])
    counts, indices = mask_to_kv_blocks(mask)
    assert counts.tolist() == [[[2, 1, 3]]]
    assert indices[0, 0, 0, :2].tolist() == [0, 2] and indices[0, 0, 1, 0].item() == 2
    assert counts.dtype == torch.int32 and indices.dtype == torch.int32


def test_kv_blocks_compact_form_round_trips_and_counts():
    """`KVBlocks` keeps only as many index columns as the fullest row; its mask, count and reference output are
    those of the bool mask it came from; a full one is every block without sorting."""
    _, _, _, mask = _inputs(2, 3, 150, 8, 16, 0.3, seed=5)  # 10 blocks, ragged last block
    mask[0, 0, 4] = False  # a row that keeps nothing
    blocks = KVBlocks.from_mask(mask, 150, 16)
    assert blocks.kept == int(mask.sum()) and blocks.indices.shape[-1] == int(mask.sum(-1).max()) < 10
    assert blocks.counts.dtype == blocks.indices.dtype == torch.int32
    assert torch.equal(blocks.to_mask(), mask)
    full = KVBlocks.full(2, 3, 150, 16, torch.device("cpu"))
    assert full.kept == 2 * 3 * 100 and full.to_mask().all()
    q, k, v, _ = _inputs(2, 3, 150, 8, 16, 0.3, seed=6)
    out, lse = block_sparse_attention(q, k, v, blocks, backend="reference")
    ref_out, ref_lse = reference_attention(q, k, v, mask, 16)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert (out[0, 0, 64:80] == 0).all() and torch.isinf(lse[0, 0, 64:80]).all()
    with pytest.raises(ValueError, match="kv blocks must cover"):
        block_sparse_attention(q, k, v, blocks, 32, backend="reference")
    with pytest.raises(ValueError, match="kv blocks must cover"):
        block_sparse_attention(q[:, :, :140], k[:, :, :140], v[:, :, :140], blocks, backend="reference")


@needs_triton
def test_triton_kernels_under_interpreter():
    if CHILD:
        pytest.skip("this is the child")
    env = dict(os.environ, TRITON_INTERPRET="1", ACCEL_TRITON_CHILD="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__), "-k", "triton_case"],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.split("\n")[-2]


@in_child
@pytest.mark.parametrize("length,block,d", [(50, 16, 16), (96, 32, 32), (70, 32, 24), (130, 64, 64)])
def test_triton_case_matches_reference_random_masks(length, block, d):
    q, k, v, mask = _inputs(2, 2, length, d, block, 0.5, seed=length)
    out, lse = block_sparse_attention(q, k, v, mask, block, backend="triton")
    ref_out, ref_lse = reference_attention(q, k, v, mask, block)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)


@in_child
def test_triton_case_compact_blocks_of_narrow_width():
    """Index rows narrower than nb (the width of the fullest row): the kernel steps rows by that width."""
    q, k, v, _ = _inputs(1, 2, 100, 16, 16, 1.0, seed=9)
    mask = torch.zeros(1, 2, 7, 7, dtype=torch.bool)
    mask[..., 0] = True
    mask[..., torch.arange(7), torch.arange(7)] = True
    blocks = KVBlocks.from_mask(mask, 100, 16)
    assert blocks.indices.shape[-1] == 2
    out, lse = block_sparse_attention(q, k, v, blocks, backend="triton")
    ref_out, ref_lse = reference_attention(q, k, v, mask, 16)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)


@in_child
def test_triton_case_all_blocks_equals_dense_and_non_contiguous_inputs():
    b, length, h, d, block = 1, 72, 2, 16, 16
    qkv = torch.randn(3, b, length, h, d)
    q, k, v = (t.transpose(1, 2) for t in qkv)  # (B, H, L, D) views of (B, L, H, D), as the processors make them
    mask = torch.ones(b, h, 5, 5, dtype=torch.bool)
    out, lse = block_sparse_attention(q, k, v, mask, block, backend="triton")
    dense, dense_l = _dense(q, k, v)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, dense_l, atol=2e-5, rtol=1e-4)


@in_child
@pytest.mark.parametrize("length,block", [(50, 16), (64, 32)])
def test_triton_case_importance_matches_reference(length, block):
    q, k, _, _ = _inputs(1, 2, length, 16, block, 1.0, seed=7)
    lse = dense_lse(q, k, block) + 0.3  # a stale (cached) LSE is a valid input too
    torch.testing.assert_close(
        block_importance(q, k, lse, block, backend="triton"), reference_importance(q, k, lse, block), atol=1e-5, rtol=1e-4
    )


@pytest.mark.slow
@pytest.mark.parametrize("length,block,density", [(100, 16, 0.5), (256, 64, 1.0)])
def test_flex_matches_reference(length, block, density):
    """Compiled FlexAttention: ragged random masks, and all blocks kept == dense SDPA."""
    q, k, v, mask = _inputs(1, 2, length, 16, block, density, seed=1)
    out, lse = block_sparse_attention(q, k, v, mask, block, backend="flex")
    ref_out, ref_lse = reference_attention(q, k, v, mask, block)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)
    blocks = KVBlocks.from_mask(mask, length, block)  # narrow index rows, padded for the BlockMask, built once
    for _ in range(2):
        again, _ = block_sparse_attention(q, k, v, blocks, backend="flex", need_lse=False)
        torch.testing.assert_close(again, ref_out, atol=2e-5, rtol=1e-4)
    assert blocks.flex_block_mask() is blocks.flex_block_mask()
    if density == 1.0:
        torch.testing.assert_close(out, _dense(q, k, v)[0], atol=2e-5, rtol=1e-4)


def test_backend_choice_and_validation():
    assert resolve_backend("auto", torch.device("cpu")) == "flex"
    assert resolve_backend("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("cuda-magic", torch.device("cpu"))
    q = torch.zeros(1, 1, 40, 8)
    with pytest.raises(ValueError, match="kv_block_mask"):
        block_sparse_attention(q, q, q, torch.ones(1, 1, 2, 2, dtype=torch.bool), 16, backend="reference")


def test_kernels_layer_imports_no_diffusers_accel_or_server():
    code = "import sys, kernels; bad = [m for m in ('diffusers', 'accel', 'server') if m in sys.modules]; print(bad)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(kernels.__file__))))
    assert result.stdout.strip() == "[]"
