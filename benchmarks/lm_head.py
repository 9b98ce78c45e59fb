"""The float32 CPU lm_head: one matmul over the whole vocabulary against blocks of rows.

    python benchmarks/lm_head.py

Times `F.linear(h, W)` and slserve's blocked head (model/layers.py: vocab_head) on a weight of
the embedded model's lm_head shape (49152 x 576, float32), for the rows a step samples, in
alternating rounds on one machine; checks that both give the same logits. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from bench_json import write_json

from slserve.model.layers import vocab_head


def per_call(fn, h: torch.Tensor, calls: int) -> float:
    fn(h)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(h)
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 32, 64, 128, 256])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/lm_head.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    w = torch.randn(args.vocab, args.hidden) * 0.05
    heads = {"one matmul": lambda h: F.linear(h, w), "blocks": vocab_head(w)}
    rows = []
    print(
        f"lm_head {args.vocab} x {args.hidden} float32, {torch.get_num_threads()} threads; ms per call, "
        f"median of {args.rounds} alternating rounds"
    )
    print(f"{'rows':>5} {'one matmul':>11} {'blocks':>8} {'speed-up':>9}")
    for m in args.rows:
        h = torch.randn(m, args.hidden)
        torch.testing.assert_close(heads["blocks"](h), heads["one matmul"](h), rtol=1e-5, atol=1e-4)
        times = {k: [] for k in heads}
        for _ in range(args.rounds):
            for k, fn in heads.items():
                times[k].append(per_call(fn, h, args.calls))
        one, blocks = (statistics.median(times[k]) * 1e3 for k in heads)
        rows.append({"rows": m, "one_matmul_ms": one, "blocks_ms": blocks, "speedup": one / blocks})
        print(f"{m:>5} {one:>11.2f} {blocks:>8.2f} {one / blocks:>8.2f}x")
    write_json(args.out, {"args": vars(args), "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
