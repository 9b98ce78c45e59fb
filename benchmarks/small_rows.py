"""A decode step's projections at a few rows: how close they come to the memory's streaming rate.

    python benchmarks/small_rows.py [--rows 1 4 8 16 64 128] [--hints 1 256]

30 layers of SmolLM2-135M's four projection shapes (q|k|v, o, gate|up, down), distinct weights so
that every call reads its weight from memory, as one decode step does:
  bfloat16: slserve's dense() (model/layers.py: oneDNN with the weight packed once for 64 rows),
            and the same with oneDNN's packing told to expect each --hints rows instead;
  int8:     quant.int8_matmul on per-channel int8 codes of the same weights (--quantization int8);
  sum():    torch's sum over a bfloat16 tensor of the step's weight bytes: what the cores stream.
Every round times every cell in turn; the fastest round per cell. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_json import write_json
from bench_timing import per_call

from slserve.kernels.cpu_ext import cpu_ops
from slserve.model.layers import dense
from slserve.model.quant import Int8Weight, int8_matmul

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # [out, in]


def step_ms(matmuls: list, inputs: list[torch.Tensor]) -> float:
    """One step: every matmul once, each on its input."""
    t = time.perf_counter()
    for f, x in zip(matmuls, inputs, strict=True):
        f(x)
    return (time.perf_counter() - t) * 1e3


def packed(weight: torch.Tensor, hint: int):
    w = torch.ops.mkldnn._reorder_linear_weight(weight, hint)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 64, 128])
    ap.add_argument("--hints", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/small_rows.json")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    shapes = SHAPES * args.layers
    weights = [(torch.randn(o, i, generator=g) * 0.05).to(torch.bfloat16) for o, i in shapes]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    variants = {"bfloat16 (dense)": [dense(w) for w in weights]}
    variants |= {f"bfloat16, hint {h}": [packed(w, h) for w in weights] for h in args.hints}
    variants["int8"] = [int8_matmul(Int8Weight.quantize(w.float()), None, cpu_ops()) for w in weights]
    flat = torch.cat([w.flatten() for w in weights])
    inputs = {rows: [torch.randn(rows, i).to(torch.bfloat16) for _, i in shapes] for rows in args.rows}
    table = {rows: dict.fromkeys(variants, float("inf")) for rows in args.rows}
    sum_ms = float("inf")
    for _ in range(args.rounds):
        for rows, cells in table.items():
            for name, fs in variants.items():
                cells[name] = min(cells[name], step_ms(fs, inputs[rows]))
        sum_ms = min(sum_ms, per_call(torch.sum, flat, 1) * 1e3)

    print(f"{args.layers} layers, {nbytes / 1e6:.0f} MB of bfloat16 weights; sum() over them: "
          f"{sum_ms:.2f} ms ({nbytes / sum_ms / 1e6:.1f} GB/s). ms per step:")
    print("| rows | " + " | ".join(variants) + " |")
    print("|---:|" + "---:|" * len(variants))
    for rows, cells in table.items():
        print(f"| {rows} | " + " | ".join(f"{ms:.2f}" for ms in cells.values()) + " |")
    write_json(args.out, {"args": vars(args), "weight_bytes": nbytes, "sum_ms": sum_ms,
                          "ms_per_step": {str(r): cells for r, cells in table.items()}})


if __name__ == "__main__":
    main()
