"""float32 CPU matmuls of a decode step: BLAS's x @ W^T against what slserve runs instead.

    python benchmarks/lm_head.py

The lm_head: `F.linear(h, W)` against slserve's blocked head (model/layers.py: vocab_head) on a
weight of the embedded model's lm_head shape (49152 x 576). The projections: `F.linear` against
slserve's `dense` (W @ x^T for 2-16 rows) over 30 distinct weights of each SmolLM2 projection
shape (fused q|k|v, fused gate|up, down), so that they come from memory as in a step. Alternating
rounds on one machine; checks that both sides give the same output. Prints tables, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F
from bench_json import write_json
from bench_timing import per_call

from slserve.model.layers import dense, vocab_head

os.environ["SLSERVE_CPU_BLAS"] = "torch"  # this compares layouts under torch's BLAS; blas.py compares BLASes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 32, 64, 128, 256])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--projection-rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
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
    projections = []
    print("\nprojections, 30 weights of each shape, ms per weight")
    print(f"{'N x K':>10} {'rows':>5} {'F.linear':>9} {'dense':>8} {'speed-up':>9}")
    for n, k in ((960, 576), (3072, 576), (576, 1536)):
        ws = [torch.randn(n, k) * 0.05 for _ in range(30)]
        sides = {"F.linear": [lambda x, w=w: F.linear(x, w) for w in ws], "dense": [dense(w) for w in ws]}
        for m in args.projection_rows:
            x = torch.randn(m, k)
            torch.testing.assert_close(sides["dense"][0](x), sides["F.linear"][0](x), rtol=1e-5, atol=1e-4)
            times = {side: [] for side in sides}
            for _ in range(args.rounds):
                for side, fns in sides.items():
                    times[side].append(
                        per_call(lambda x, fns=fns: [f(x) for f in fns], x, args.calls) / len(ws)
                    )
            lin, ours = (statistics.median(times[side]) * 1e3 for side in sides)
            projections.append(
                {"n": n, "k": k, "rows": m, "linear_ms": lin, "dense_ms": ours, "speedup": lin / ours}
            )
            print(f"{f'{n}x{k}':>10} {m:>5} {lin:>9.3f} {ours:>8.3f} {lin / ours:>8.2f}x")
    write_json(
        args.out,
        {"args": vars(args), "threads": torch.get_num_threads(), "rows": rows, "projections": projections},
    )


if __name__ == "__main__":
    main()
