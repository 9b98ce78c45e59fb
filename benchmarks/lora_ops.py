"""Time of the batched mixed-rank LoRA term (torch path) against a rank-padded baseline and the
dense base matmul of the same layer, in one run.

    python benchmarks/lora_ops.py [--tokens 64] [--adapters 32] [--ranks 8 16 32 64]

The batch is decode-shaped: --tokens tokens spread over --adapters adapters whose ranks cycle
through --ranks. Weights sit in one flat pool at scattered offsets, as in the server. The padded
baseline zero-pads every adapter to the largest rank and runs one gathered bmm per token, the
way a padded multi-LoRA kernel does. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_json import write_json

from slserve.kernels.cpu_ext import lora_apply_op
from slserve.kernels.lora import apply_lora, slot_row


def bench(fn, reps: int) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--in-features", type=int, default=576)
    ap.add_argument("--out-features", type=int, default=1536)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out/lora_ops.json")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    n_in, n_out, T, S = args.in_features, args.out_features, args.tokens, args.adapters
    ranks = [args.ranks[i % len(args.ranks)] for i in range(S)]
    max_rank = max(ranks)

    # Scatter the adapters through a pool with gaps, in shuffled order.
    sizes = [r * (n_in + n_out) for r in ranks]
    gap = 4096
    order = torch.randperm(S).tolist()
    offsets, cursor = [0] * S, 0
    for i in order:
        offsets[i] = cursor
        cursor += sizes[i] + gap
    pool = torch.randn(cursor, dtype=dtype) * 0.02
    views, rows = [], []
    for off, r in zip(offsets, ranks, strict=True):
        a = pool[off : off + r * n_in].view(r, n_in)
        bt = pool[off + r * n_in : off + r * (n_in + n_out)].view(r, n_out)
        views.append((a, bt))
        rows.append(slot_row(off, r, n_in, [(off + r * n_in, r, n_out, 0, 0)]))

    # Tokens grouped by adapter: as even a split as T and S allow.
    cuts = [round(i * T / S) for i in range(S + 1)]
    bounds = torch.tensor([[cuts[i], cuts[i + 1]] for i in range(S)], dtype=torch.int64)
    slots = torch.tensor(rows, dtype=torch.int64)
    x = torch.randn(T, n_in, dtype=dtype)
    y = torch.zeros(T, n_out, dtype=dtype)
    w = torch.randn(n_out, n_in, dtype=dtype) * 0.02

    # Padded baseline: every adapter padded to max_rank in a dense [S, in, R] / [S, R, out] stack
    # (built once, outside the timing), then one gathered bmm pair over the tokens.
    a_pad = torch.zeros(S, n_in, max_rank, dtype=dtype)
    b_pad = torch.zeros(S, max_rank, n_out, dtype=dtype)
    for i, (a, bt) in enumerate(views):
        a_pad[i, :, : ranks[i]] = a.t()
        b_pad[i, : ranks[i]] = bt
    token_adapter = torch.cat([torch.full((cuts[i + 1] - cuts[i],), i) for i in range(S)])

    y_pad = torch.zeros_like(y)

    def padded():
        h = torch.bmm(x[:, None, :], a_pad[token_adapter])  # [T, 1, R]
        return y_pad + torch.bmm(h, b_pad[token_adapter])[:, 0]

    def ours_python():
        apply_lora(y, x, pool, bounds, slots)

    op = lora_apply_op()

    def ours():  # the engine's CPU path: the C++ loop (kernels/csrc/lora_cpu.cpp)
        op(y, x, pool, bounds, slots)

    def dense():
        return torch.nn.functional.linear(x, w)

    # Check the two LoRA paths agree before timing them.
    for fn in (ours, ours_python):
        y.zero_()
        fn()
        torch.testing.assert_close(y.float(), padded().float(), atol=2e-2, rtol=2e-2)

    t_ours, t_pad, t_dense = bench(ours, args.reps), bench(padded, args.reps), bench(dense, args.reps)
    t_python = bench(ours_python, args.reps)
    row = {
        "tokens": T, "adapters": S, "ranks": sorted(set(ranks)), "sum_of_ranks": sum(ranks),
        "shape": [n_in, n_out], "dtype": args.dtype,
        "slserve_lora_us": t_ours * 1e6, "slserve_python_loop_us": t_python * 1e6,
        "padded_lora_us": t_pad * 1e6, "dense_layer_us": t_dense * 1e6,
        "lora_weight_bytes": sum(sizes) * pool.element_size(),
        "dense_weight_bytes": w.numel() * w.element_size(),
        "speedup_vs_padded": t_pad / t_ours, "lora_over_dense": t_ours / t_dense,
    }
    print(f"decode batch: {T} tokens over {S} adapters, ranks {sorted(set(ranks))}, layer {n_in}->{n_out}, "
          f"{args.dtype}")
    print(f"{'path':34} {'time (us)':>10}")
    print(f"{'slserve LoRA, C++ loop (engine)':34} {row['slserve_lora_us']:>10.1f}")
    print(f"{'slserve LoRA, Python loop':34} {row['slserve_python_loop_us']:>10.1f}")
    print(f"{'padded LoRA (rank ' + str(max_rank) + ', gathered bmm)':34} {row['padded_lora_us']:>10.1f}")
    print(f"{'dense base matmul':34} {row['dense_layer_us']:>10.1f}")
    mib = 2**20
    print(f"speedup vs padded: {row['speedup_vs_padded']:.2f}x   LoRA / dense: {row['lora_over_dense']:.1%}")
    lora_mib, dense_mib = row["lora_weight_bytes"] / mib, row["dense_weight_bytes"] / mib
    print(f"weights read: LoRA {lora_mib:.1f} MiB, dense {dense_mib:.1f} MiB")
    write_json(args.out, {"args": vars(args), "result": row})


if __name__ == "__main__":
    main()
