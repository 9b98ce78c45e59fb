"""Decode attention on the CPU: the C++ op (kernels/csrc/attention_cpu.cpp) against the torch path.

    python benchmarks/decode_attention.py --out benchmarks/results/decode_attention.json
    python benchmarks/decode_attention.py --batches 256 --dtypes bfloat16 --pages 16 32 64

The attention of one decode step as SmolLM2-135M has it (9 query heads, 3 kv heads, head_dim 64,
16-token pages or --pages, the pool's [pages, layers, 2, P, KVH, D] layout with pages in random order), for
batches of sequences with contexts drawn from a range: every layer in turn, as a step runs them,
so that each layer's K and V come from memory rather than from a cache the previous call warmed.
Times the C++ op and the torch path (`paged_attention` with no decode op: gather, batched
matmuls, softmax) per layer, checks that both give the same output, and reports the rate at
which the op reads K and V next to the rate `sum()` streams 512 MB from memory. Prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse

import torch
from bench_json import write_json
from lora_ops import bench

from slserve.kernels import cpu_ext
from slserve.kernels.attention import build_attention_groups, paged_attention

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30


def case(batch: int, ctx_lo: int, ctx_hi: int, dtype: torch.dtype, reps: int, seed: int,
         page: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(ctx_lo, ctx_hi + 1, (batch,), generator=g).tolist()
    per_seq = [(n + page - 1) // page for n in ctx]
    pool = torch.randn(sum(per_seq) + 8, LAYERS, 2, page, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    order = torch.randperm(pool.shape[0], generator=g).tolist()
    tables, used = [], 0
    for n in per_seq:
        tables.append(order[used : used + n])
        used += n
    groups = build_attention_groups([1] * batch, ctx, tables, page, "cpu")
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=g).to(dtype)
    scale = HEAD_DIM**-0.5
    op = cpu_ext.decode_attention_op()

    out_op = paged_attention(q, pool[:, 0, 0], pool[:, 0, 1], groups, scale, decode_op=op)
    out_torch = paged_attention(q, pool[:, 0, 0], pool[:, 0, 1], groups, scale)
    max_err = (out_op.float() - out_torch.float()).abs().max().item()

    def every_layer(decode_op) -> None:
        for layer in range(LAYERS):
            paged_attention(q, pool[:, layer, 0], pool[:, layer, 1], groups, scale, decode_op=decode_op)

    op_ms = 1e3 * bench(lambda: every_layer(op), reps) / LAYERS
    torch_ms = 1e3 * bench(lambda: every_layer(None), reps) / LAYERS
    kv_bytes = sum(ctx) * 2 * KV_HEADS * HEAD_DIM * pool.element_size()
    return {
        "batch": batch, "ctx": [ctx_lo, ctx_hi], "dtype": str(dtype).removeprefix("torch."), "page": page,
        "op_ms": round(op_ms, 3), "torch_ms": round(torch_ms, 3), "speedup": round(torch_ms / op_ms, 2),
        "kv_mb": round(kv_bytes / 1e6, 1), "op_gb_s": round(kv_bytes / op_ms / 1e6, 1),
        "max_abs_diff": max_err,
    }


def stream_rate() -> float:
    """GB/s at which `sum()` streams 512 MB (well past any cache) on these cores."""
    big = torch.ones(128 << 20)
    return big.numel() * 4 / bench(big.sum, 5) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128, 256])
    ap.add_argument("--ctx", type=int, nargs=2, default=[64, 128], metavar=("LO", "HI"))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--pages", type=int, nargs="+", default=[16],
                    help="tokens per KV page (the server's --page-tokens; 16 by default)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out/decode_attention.json")
    args = ap.parse_args()
    if cpu_ext.decode_attention_op() is None:
        raise SystemExit("the C++ CPU helpers are not built here (SLSERVE_CPU_EXT disabled or no compiler)")

    stream_gb_s = stream_rate()
    rows = [case(b, *args.ctx, getattr(torch, d), args.reps, args.seed, page)
            for d in args.dtypes for b in args.batches for page in args.pages]
    print(f"per layer, {LAYERS} layers in turn, {HEADS} q heads / {KV_HEADS} kv heads, head_dim {HEAD_DIM}, "
          f"contexts {args.ctx[0]}-{args.ctx[1]}")
    print(f"sum() over 512 MB: {stream_gb_s:.1f} GB/s")
    print("| dtype | batch | page | K+V MB | C++ op ms | torch ms | speed-up | op GB/s | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['batch']} | {r['page']} | {r['kv_mb']} | {r['op_ms']} | {r['torch_ms']} "
              f"| {r['speedup']}x | {r['op_gb_s']} | {r['max_abs_diff']:.1e} |")
    write_json(args.out, {"cpu": cpu_ext.cpu_isa(), "threads": torch.get_num_threads(),
                          "sum_512mb_gb_s": round(stream_gb_s, 1), "rows": rows})


if __name__ == "__main__":
    main()
