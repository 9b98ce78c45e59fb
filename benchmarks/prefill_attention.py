"""Prompt attention on the CPU: every query token as a row of the C++ op against SDPA.

    python benchmarks/prefill_attention.py --out benchmarks/results/prefill_attention.json

The engine's CPU path (kernels/attention.py, TokenRows) passes every query token of a step to the
C++ attention op as one row: a prompt token attends to the keys up to its own position through
its sequence's block table, a decode row to its whole context. The path it replaced padded each
step's prompts into one group and ran SDPA with a mask over gathered K/V. Both are timed here on
SmolLM2-135M's shapes (9 query heads, 3 kv heads, head_dim 64, 16-token pages in random order
in the pool's layout), bfloat16, every layer in turn as a step runs them, for steps of equal
prompts and for a mixed step (decode rows plus prompts), with the largest difference between
the two outputs. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse

import torch
from bench_json import write_json
from lora_ops import bench

from slserve.kernels import cpu_ext
from slserve.kernels.attention import (
    build_attention_groups,
    build_token_rows,
    paged_attention,
    token_row_attention,
)

HEADS, KV_HEADS, HEAD_DIM, PAGE, LAYERS = 9, 3, 64, 16, 30


def case(prompts: int, length: int, decodes: int, reps: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    q_lens = [1] * decodes + [length] * prompts
    ctx = torch.randint(64, 129, (decodes,), generator=g).tolist() + [length] * prompts
    per_seq = [(n + PAGE - 1) // PAGE for n in ctx]
    pool = torch.randn(sum(per_seq) + 8, LAYERS, 2, PAGE, KV_HEADS, HEAD_DIM, generator=g).to(torch.bfloat16)
    order = torch.randperm(pool.shape[0], generator=g).tolist()
    tables, used = [], 0
    for n in per_seq:
        tables.append(order[used : used + n])
        used += n
    q = torch.randn(sum(q_lens), HEADS, HEAD_DIM, generator=g).to(torch.bfloat16)
    scale = HEAD_DIM**-0.5
    op = cpu_ext.decode_attention_op()
    rows = build_token_rows(q_lens, ctx, tables, PAGE, "cpu")
    groups = build_attention_groups(q_lens, ctx, tables, PAGE, "cpu")

    def rows_path(layer: int) -> torch.Tensor:
        return token_row_attention(q, pool[:, layer, 0], pool[:, layer, 1], rows, scale, op)

    def groups_path(layer: int) -> torch.Tensor:  # decode rows through the op, prompts through SDPA
        return paged_attention(q, pool[:, layer, 0], pool[:, layer, 1], groups, scale, decode_op=op)

    diff = (rows_path(0).float() - groups_path(0).float()).abs().max().item()
    rows_ms = 1e3 * bench(lambda: [rows_path(i) for i in range(LAYERS)], reps) / LAYERS
    sdpa_ms = 1e3 * bench(lambda: [groups_path(i) for i in range(LAYERS)], reps) / LAYERS
    return {"decode_rows": decodes, "prompts": prompts, "prompt_len": length,
            "query_tokens": len(rows.q_index), "token_rows_ms": round(rows_ms, 3),
            "sdpa_groups_ms": round(sdpa_ms, 3), "speedup": round(sdpa_ms / rows_ms, 2), "max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["0:32x64", "0:8x256", "0:4x512", "0:1x2048", "256:32x64"],
                    help="DECODE_ROWS:PROMPTSxLENGTH")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out/prefill_attention.json")
    args = ap.parse_args()
    if cpu_ext.decode_attention_op() is None:
        raise SystemExit("the C++ CPU helpers are not built here (SLSERVE_NO_CPU_EXT set or no compiler)")
    results = []
    for spec in args.cases:
        decodes, shape = spec.split(":")
        prompts, length = (int(v) for v in shape.split("x"))
        results.append(case(prompts, length, int(decodes), args.reps, args.seed))
    print(f"bfloat16, per layer, {LAYERS} layers in turn, {HEADS} q heads / {KV_HEADS} kv heads, "
          f"head_dim {HEAD_DIM}")
    print("| decode rows | prompts x length | token rows (ms) | SDPA groups (ms) | speed-up | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['decode_rows']} | {r['prompts']} x {r['prompt_len']} | {r['token_rows_ms']} "
              f"| {r['sdpa_groups_ms']} | {r['speedup']}x | {r['max_abs_diff']:.1e} |")
    write_json(args.out, {"cpu": cpu_ext.cpu_isa(), "threads": torch.get_num_threads(), "rows": results})


if __name__ == "__main__":
    main()
