"""Microbenchmark of block-sparse attention: time of the chosen backend (compiled flex on CPU, Triton on CUDA)
over dense SDPA, per (L, D, sparsity), median of interleaved runs. Writes kernels.json and kernels.md to --out.

    python scripts/bench_kernels.py --out out/bench-kernels                 # default: short (a few minutes on CPU)
    python scripts/bench_kernels.py --lengths 4096 16384 32768 --heads 8 --out out/bench-kernels-long

Masks: random top-k per query row at the given sparsity, k = round((1 - s) * nb) for every row (the shape
AdaSpa produces), fixed seed. Each mask becomes `KVBlocks` once, before timing (its flex BlockMask on first use),
as sparse_attention does once per search: a timed call is the kernel alone. On CPU the first call of each shape
compiles (not timed: one warm-up per case).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import KVBlocks, block_sparse_attention, num_blocks  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def topk_mask(b, h, nb, sparsity, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = max(1, round((1.0 - sparsity) * nb))
    scores = torch.rand(b, h, nb, nb, generator=g)
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros(b, h, nb, nb, dtype=torch.bool).scatter_(-1, idx, True).to(device)


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--backend", default="auto", choices=["auto", "flex", "triton", "reference"])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed runs per case (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu_model()}, {args.threads} threads"
    rows = []
    with torch.inference_mode():
        for length in args.lengths:
            for d in args.dims:
                q, k, v = (torch.randn(1, args.heads, length, d, device=device, dtype=dtype) for _ in range(3))
                nb = num_blocks(length, args.block_size)
                masks = {s: topk_mask(1, args.heads, nb, s, device) for s in args.sparsities}
                blocks = {s: KVBlocks.from_mask(m, length, args.block_size) for s, m in masks.items()}
                dense = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
                sparse = {
                    s: (lambda kv=kv: block_sparse_attention(q, k, v, kv, backend=args.backend, need_lse=False))
                    for s, kv in blocks.items()
                }
                compile_s = timed(sparse[args.sparsities[0]], sync)  # warm-up: compiles the shape
                for fn in (dense, *sparse.values()):
                    fn()
                times = {"dense": [], **{s: [] for s in args.sparsities}}
                for _ in range(args.repeats):  # interleaved: dense, then each sparsity, per round
                    times["dense"].append(timed(dense, sync))
                    for s, fn in sparse.items():
                        times[s].append(timed(fn, sync))
                dense_t = statistics.median(times["dense"])
                for s in args.sparsities:
                    t = statistics.median(times[s])
                    kept = float(masks[s].float().mean())
                    rows.append(dict(L=length, D=d, heads=args.heads, sparsity=s, kept_fraction=round(kept, 4),
                                     dense_s=round(dense_t, 5), sparse_s=round(t, 5), ratio=round(t / dense_t, 4),
                                     speedup=round(dense_t / t, 3), first_call_s=round(compile_s, 2)))
                    print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device_name, torch=torch.__version__, dtype=str(dtype).replace("torch.", ""),
                backend=args.backend, block_size=args.block_size, repeats=args.repeats,
                command="python scripts/bench_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv))
    (out / "kernels.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']}; {meta['dtype']}; backend {meta['backend']}; "
        f"blocks of {meta['block_size']}; {args.heads} heads, batch 1; median of {args.repeats} interleaved runs.",
        "",
        "| L | D | sparsity | kept | dense SDPA (s) | block-sparse (s) | time ratio | speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['L']} | {r['D']} | {r['sparsity']} | {r['kept_fraction']:.3f} | {r['dense_s']:.4f} | "
                     f"{r['sparse_s']:.4f} | {r['ratio']:.3f} | {r['speedup']:.2f}x |")
    (out / "kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
