"""The lm_head under --quantization w8a8 against the bfloat16 head, on the embedded model's shape.

    python benchmarks/w8a8_head.py [--rows 1 16 64 256 512] [--blocks 4096 8192 16384 49152]

bfloat16: slserve's head (model/layers.py: vocab_head, oneDNN with the weight packed once).
w8a8: quant.w8a8_matmul on the int8 copy of the same weight, with its int8 products in blocks of
each --blocks output columns (model/quant.py: W8A8_COLUMN_BLOCK; 49152 is one product). Alternating
rounds on one machine, the fastest round per cell; checks that every block size gives the same
output. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse

import torch
from bench_json import write_json
from bench_timing import per_call

from slserve.kernels.cpu_ext import cpu_ops
from slserve.model.layers import vocab_head
from slserve.model.quant import W8A8_COLUMN_BLOCK, W8A8Weight, w8a8_matmul


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 512])
    ap.add_argument("--blocks", type=int, nargs="+", default=[4096, 8192, 16384, 49152])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/w8a8_head.json")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.05).to(torch.bfloat16)
    bf16 = vocab_head(weight)
    w8 = W8A8Weight.quantize(weight.float())
    ops = cpu_ops()

    heads = {"bfloat16": bf16, **{f"w8a8 /{b}": w8a8_matmul(w8, None, ops, b) for b in args.blocks}}
    rows = []
    for n in args.rows:
        h = torch.randn(n, args.hidden, generator=g).to(torch.bfloat16)
        outs = [heads[f"w8a8 /{b}"](h) for b in args.blocks]
        assert all(torch.equal(o, outs[0]) for o in outs), "block sizes disagree"
        best = {name: float("inf") for name in heads}
        for _ in range(args.rounds):
            for name, fn in heads.items():
                best[name] = min(best[name], per_call(fn, h, args.calls))
        rows.append({"rows": n, "ms": {name: t * 1e3 for name, t in best.items()}})

    print(f"lm_head {args.vocab} x {args.hidden}, ms per call (fastest of {args.rounds} rounds), "
          f"{torch.get_num_threads()} threads")
    # against the block the server uses, where measured (else the fastest block)
    shipped = f"w8a8 /{W8A8_COLUMN_BLOCK}"
    print(f"{'rows':>6}" + "".join(f"{name:>14}" for name in heads) + f"{'bf16 / w8a8':>13}")
    for r in rows:
        ms = r["ms"]
        w8a8 = ms.get(shipped, min(v for k, v in ms.items() if k != "bfloat16"))
        print(f"{r['rows']:>6}" + "".join(f"{ms[name]:>14.2f}" for name in heads)
              + f"{ms['bfloat16'] / w8a8:>12.2f}x")
    write_json(args.out, {"args": vars(args), "torch_threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
