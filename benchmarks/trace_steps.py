"""Where the side-by-side trace's time goes in the engine, step by step, against the arithmetic.

    python benchmarks/trace_steps.py                                  # base model
    python benchmarks/trace_steps.py --adapter-dir /tmp/ad100          # 100 adapters, zipf

Replays the trace's shape offline (trace_replay.py: 256 requests at 32/s, 64 + 64 tokens) and
records every step: its prompt rows, decode rows, distinct adapters and duration. Then one more
replay under torch's profiler gives the time per kind of op, and a bfloat16 matmul of the
projections' shapes, timed in the same process, gives the rate these cores reach. Prints:
  - steps with prompt rows against decode-only steps: rows, seconds, ms per row;
  - the time per kind of op (projections and head, attention, LoRA, the rest);
  - the projections' and head's arithmetic (2 x weights per row; the head only for rows that
    sample) at the measured matmul rate: the floor no scheduling or loop can go under.
Writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_json import write_json
from trace_replay import Trace, replay

from slserve import LLM

OP_KINDS = (("projections and head", ("linear", "mm")), ("attention", ("attention",)),
            ("LoRA", ("lora",)))


def weights_per_row(cfg) -> tuple[int, int]:
    """(weights of the 30 layers' projections, of the lm_head) that one row multiplies."""
    h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    q = cfg.num_heads * cfg.head_dim
    layer = h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size
    return cfg.num_layers * layer, cfg.vocab_size * h


def matmul_rate(cfg, rows: int, reps: int = 20) -> float:
    """bfloat16 GFLOP/s of the layer's widest projection (gate and up together) at `rows` rows."""
    x = torch.randn(rows, cfg.hidden_size, dtype=torch.bfloat16)
    w = torch.randn(2 * cfg.intermediate_size, cfg.hidden_size, dtype=torch.bfloat16)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(x, w)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * rows * w.numel() / best / 1e9


def record_steps(engine, trace: Trace) -> tuple[float, list[dict]]:
    """Replay `trace`; (seconds, one dict per step: prompt rows, decode rows, adapters, seconds)."""
    scheduler, schedule = engine.scheduler, engine.scheduler.schedule
    steps: list[dict] = []

    def recording():
        out = schedule()
        prompt = sum(n for req, n in out.scheduled if n > 1)
        decode = sum(1 for req, n in out.scheduled if n == 1)
        adapters = len({req.adapter for req, _ in out.scheduled if req.adapter})
        steps.append({"prompt_rows": prompt, "decode_rows": decode, "adapters": adapters})
        return out

    scheduler.schedule = recording
    try:
        times: list[float] = []
        seconds = replay(engine, trace, times.append)
    finally:
        del scheduler.schedule  # the bound method again
    for step, t in zip(steps, times, strict=True):
        step["seconds"] = t
    return seconds, steps


def op_seconds(engine, trace: Trace) -> dict[str, float]:
    """Self CPU seconds of the engine thread's ops over one replay, by kind (OP_KINDS, the rest)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = replay(engine, trace)
    totals = {kind: 0.0 for kind, _ in OP_KINDS} | {"other ops": 0.0}
    for event in prof.key_averages():
        name = event.key.lower()
        kind = next((k for k, keys in OP_KINDS if any(s in name for s in keys)), "other ops")
        totals[kind] += event.self_cpu_time_total / 1e6
    totals["outside ops (Python, scheduling)"] = max(0.0, wall - sum(totals.values()))
    return totals


def summarize(steps: list[dict]) -> dict[str, dict]:
    classes = {"steps with prompt rows": [s for s in steps if s["prompt_rows"]],
               "decode-only steps": [s for s in steps if not s["prompt_rows"]]}
    out = {}
    for name, group in classes.items():
        rows = sum(s["prompt_rows"] + s["decode_rows"] for s in group)
        seconds = sum(s["seconds"] for s in group)
        out[name] = {"steps": len(group), "prompt_rows": sum(s["prompt_rows"] for s in group),
                     "decode_rows": sum(s["decode_rows"] for s in group), "seconds": seconds,
                     "ms_per_row": 1e3 * seconds / max(rows, 1),
                     "adapters_per_step": statistics.mean(s["adapters"] for s in group) if group else 0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter-dir", default=None, help="serve the trace over these adapters")
    ap.add_argument("--dist", choices=["uniform", "zipf"], default="zipf")
    ap.add_argument("--rounds", type=int, default=2, help="timed replays (the median one is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out/trace_steps.json")
    args = ap.parse_args()

    llm = LLM(adapter_dir=args.adapter_dir, preload_adapters=bool(args.adapter_dir))
    engine, cfg = llm.engine, llm.engine.model_config
    names = llm.adapters()[:100] if args.adapter_dir else None
    replay(engine, Trace.draw(-1, names=names, dist=args.dist))  # warm-up: kernels, pool, adapters
    runs = [record_steps(engine, Trace.draw(args.seed + r, names=names, dist=args.dist))
            for r in range(args.rounds)]
    seconds, steps = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    trace = Trace.draw(args.seed, names=names, dist=args.dist)
    ops = op_seconds(engine, trace)
    rates = {rows: matmul_rate(cfg, rows) for rows in (256, 2048)}

    lin, head = weights_per_row(cfg)
    rows = sum(s["prompt_rows"] + s["decode_rows"] for s in steps)
    sampled = trace.output_tokens  # every token out comes from one row through the head
    flops = 2 * (rows * lin + sampled * head)
    floor = flops / (max(rates.values()) * 1e9)
    by_class = summarize(steps)

    label = f"100 adapters ({args.dist})" if names else "base model"
    print(f"the trace offline, {label}: {len(trace.prompts)} requests, {trace.output_tokens} tokens out "
          f"in {seconds:.2f} s ({trace.output_tokens / seconds:.1f} tok/s; median of "
          f"{[round(r[0], 2) for r in runs]}), {len(steps)} steps, {torch.get_num_threads()} threads")
    print("\n| steps | count | prompt rows | decode rows | seconds | ms per row | adapters per step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, c in by_class.items():
        print(f"| {name} | {c['steps']} | {c['prompt_rows']} | {c['decode_rows']} | {c['seconds']:.2f} "
              f"| {c['ms_per_row']:.3f} | {c['adapters_per_step']:.1f} |")
    total = sum(ops.values())
    print(f"\n| op kind (profiled replay, {total:.1f} s) | seconds | share |")
    print("|---|---:|---:|")
    for kind, s in ops.items():
        print(f"| {kind} | {s:.2f} | {100 * s / total:.1f}% |")
    lin_s = ops["projections and head"]
    print(f"\nprojections and head: {flops / 1e12:.2f} TFLOP ({rows} rows x {2 * lin / 1e6:.0f} MFLOP, "
          f"{sampled} rows x {2 * head / 1e6:.0f} MFLOP through the head) in {lin_s:.2f} s: "
          f"{flops / lin_s / 1e9:.0f} GFLOP/s in the engine")
    print("bfloat16 matmul, gate+up shape, this process: " +
          ", ".join(f"{r} rows {g:.0f} GFLOP/s" for r, g in rates.items()))
    print(f"floor at the best of those rates: {floor:.2f} s for the arithmetic alone, "
          f"{trace.output_tokens / floor:.0f} tok/s; the replay took {seconds / floor:.2f}x that")
    write_json(args.out, {"args": vars(args), "threads": torch.get_num_threads(), "seconds": seconds,
                          "runs": [r[0] for r in runs], "steps": steps, "by_class": by_class,
                          "op_seconds": ops, "matmul_gflops": rates, "flops": flops,
                          "floor_seconds": floor})


if __name__ == "__main__":
    main()
