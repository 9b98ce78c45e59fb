"""float32 CPU matmuls: torch's BLAS (MKL) against OpenBLAS, as slserve's layers run them.

    python benchmarks/blas.py

1. Matmuls: every SmolLM2 projection shape (fused q|k|v, o, fused gate|up, down) over 30
   distinct weights, so that they come from memory as in a step, and the 49152 x 576 lm_head,
   at 1-256 rows. Each side is the layer slserve builds (model/layers.py: `dense`, `vocab_head`)
   with SLSERVE_CPU_BLAS=torch and =openblas, in one process, alternating rounds; both must
   give the same output.
2. Engine: decode steps of the embedded model with 128 running requests (64-token prompts),
   one process per choice, alternated: median step time, and the time to prefill the 128.

Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from bench_json import write_json

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
VOCAB = (49152, 576)


def build(choice: str):
    """slserve's dense and vocab_head builders with the BLAS `choice`."""
    from slserve.kernels import cpu_ext
    from slserve.model import layers

    os.environ["SLSERVE_CPU_BLAS"] = choice
    cpu_ext.float32_gemm.cache_clear()
    gemm = cpu_ext.float32_gemm()
    if (gemm is None) != (choice == "torch"):
        sys.exit(f"SLSERVE_CPU_BLAS={choice} is not available here")
    return layers.dense, layers.vocab_head


def per_weight(fns, x: torch.Tensor, calls: int) -> float:
    for f in fns:
        f(x)
    t0 = time.perf_counter()
    for _ in range(calls):
        for f in fns:
            f(x)
    return (time.perf_counter() - t0) / calls / len(fns)


def matmuls(args) -> list[dict]:
    torch.manual_seed(0)
    weights = {name: [torch.randn(*shape) * 0.05 for _ in range(30)] for name, shape in SHAPES.items()}
    weights["lm_head"] = [torch.randn(*VOCAB) * 0.05]
    sides = {}
    for choice in ("torch", "openblas"):
        dense, head = build(choice)
        sides[choice] = {name: [head(w) if name == "lm_head" else dense(w) for w in ws]
                         for name, ws in weights.items()}
    rows = []
    print(f"float32, {torch.get_num_threads()} threads; GFLOP/s, median of {args.rounds} alternating rounds")
    print(f"{'matrix':>8} {'N x K':>11} {'rows':>5} {'torch':>7} {'OpenBLAS':>9} {'ratio':>6}")
    for name, ws in weights.items():
        n, k = ws[0].shape
        for m in args.rows:
            x = torch.randn(m, k)
            torch.testing.assert_close(sides["openblas"][name][0](x), sides["torch"][name][0](x),
                                       rtol=1e-4, atol=1e-4)
            times = {c: [] for c in sides}
            for _ in range(args.rounds):
                for c in sides:
                    times[c].append(per_weight(sides[c][name], x, args.calls))
            rate = {c: 2 * m * n * k / statistics.median(t) / 1e9 for c, t in times.items()}
            ratio = rate["openblas"] / rate["torch"]
            rows.append({"matrix": name, "n": n, "k": k, "rows": m, "torch_gflops": rate["torch"],
                         "openblas_gflops": rate["openblas"], "ratio": ratio})
            print(f"{name:>8} {f'{n}x{k}':>11} {m:>5} {rate['torch']:>7.1f} {rate['openblas']:>9.1f} "
                  f"{ratio:>5.2f}x")
    return rows


def engine_child(batch: int, steps: int) -> None:
    """Run in a child process: fill the engine, time decode steps, print one JSON line."""
    import random

    from decode_step import fill, timed_steps

    from slserve import LLM

    engine = LLM(dtype="float32").engine
    t0 = time.perf_counter()
    fill(engine, [None] * batch, random.Random(0), steps)
    prefill = time.perf_counter() - t0
    times = timed_steps(engine, steps)
    print(json.dumps({"prefill_s": prefill, "step_ms": statistics.median(times) * 1e3}))


def engine(args) -> list[dict]:
    runs = []
    print(f"\nengine: {args.batch} requests, decode step median of {args.steps}, one process per run")
    print(f"{'round':>5} {'BLAS':>9} {'prefill s':>10} {'step ms':>8}")
    for r in range(args.engine_rounds):
        for choice in ("torch", "openblas"):
            cmd = [sys.executable, __file__, "--engine-child", str(args.batch), str(args.steps)]
            out = subprocess.run(cmd, env=dict(os.environ, SLSERVE_CPU_BLAS=choice), capture_output=True,
                                 text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1]) | {"round": r, "blas": choice}
            runs.append(res)
            print(f"{r:>5} {choice:>9} {res['prefill_s']:>10.1f} {res['step_ms']:>8.1f}")
    for what in ("prefill_s", "step_ms"):
        t = statistics.median(x[what] for x in runs if x["blas"] == "torch")
        o = statistics.median(x[what] for x in runs if x["blas"] == "openblas")
        print(f"{what}: torch {t:.1f}, OpenBLAS {o:.1f}, speed-up {t / o:.2f}x")
    return runs


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--engine-child":
        engine_child(int(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--engine-rounds", type=int, default=2, help="0 skips the engine part")
    ap.add_argument("--out", default="benchmarks/results/blas.json")
    args = ap.parse_args()
    result = {"args": vars(args), "threads": torch.get_num_threads(), "matmuls": matmuls(args)}
    if args.engine_rounds:
        result["engine"] = engine(args)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
