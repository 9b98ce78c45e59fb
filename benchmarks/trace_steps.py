"""Where the side-by-side trace's time goes in the engine, step by step, against the arithmetic.

    python benchmarks/trace_steps.py                                  # base model
    python benchmarks/trace_steps.py --adapter-dir /tmp/ad100          # 100 adapters, zipf

Replays the trace's shape offline (trace_replay.py: 256 requests at 32/s, 64 + 64 tokens) and
records every step: its prompt rows, one-token rows (decode, or a prompt's last chunk of one),
distinct adapters, duration and the forward pass's share. One more replay under torch's profiler
gives the time per kind of op. The same matmuls are timed alone in the same process before,
between and after the replays (the host's load moves them by 10-20% within minutes; the best
is kept). Prints:
  - steps with prompt rows against decode-only steps: rows, seconds, ms per row;
  - the time per kind of op (projections and head, attention, LoRA, the rest);
  - the projections' and head's arithmetic (2 x weights per row; the head only for rows that
    sample) at the rates the same matmuls reach alone (a whole decoder's projections, each layer
    with weights of its own; the head): the floor no scheduling or loop can go under.
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
from slserve.model.layers import dense

OP_KINDS = (("projections and head", ("linear", "mm")), ("attention", ("attention",)),
            ("LoRA", ("lora",)))


def projection_shapes(cfg) -> tuple[tuple[int, int], ...]:
    """(out, in) of one layer's projections as the engine fuses them: qkv, o, gate+up, down."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return (q + 2 * kv, h), (h, q), (2 * inter, h), (h, inter)


def weights_per_row(cfg) -> tuple[int, int]:
    """(weights of all layers' projections, of the lm_head) that one row multiplies."""
    return cfg.num_layers * sum(n * k for n, k in projection_shapes(cfg)), cfg.vocab_size * cfg.hidden_size


def best_seconds(fn, reps: int = 3) -> float:
    """The fastest of `reps` calls after one warm-up: the rate the cores reach when the host
    lets them (lora_ops.bench's median would fold the host's load into the floor)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rates(cfg, rows: int) -> dict[str, float]:
    """bfloat16 GFLOP/s at `rows` rows, weights packed as the engine packs them (model/layers.py
    `dense`): every layer's four projections in turn, each layer with weights of its own as in
    the model (so they come from memory, not from the previous call's cache), and the lm_head."""
    h, shapes = cfg.hidden_size, projection_shapes(cfg)
    layers = [[dense(torch.randn(n, k, dtype=torch.bfloat16) * 0.02) for n, k in shapes]
              for _ in range(cfg.num_layers)]
    xs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for _, k in shapes}

    def decoder():
        for weights in layers:
            for (_, k), matmul in zip(shapes, weights, strict=True):
                matmul(xs[k])

    head = dense(torch.randn(cfg.vocab_size, h, dtype=torch.bfloat16) * 0.02)
    x = xs[h]
    flops = 2 * rows * weights_per_row(cfg)[0]
    return {"projections": flops / best_seconds(decoder) / 1e9,
            "head": 2 * rows * cfg.vocab_size * h / best_seconds(lambda: head(x)) / 1e9}


def rates_now(cfg) -> dict[str, float]:
    return {f"{kind} {rows}": g for rows in (256, 2048) for kind, g in matmul_rates(cfg, rows).items()}


def record_steps(engine, trace: Trace) -> tuple[float, list[dict]]:
    """Replay `trace`; (seconds, one dict per step: prompt rows, one-token rows, distinct
    adapters, the step's seconds and the seconds of its forward pass)."""
    scheduler, schedule = engine.scheduler, engine.scheduler.schedule
    execute = engine._execute
    steps: list[dict] = []

    def timed_execute(plan):
        t0 = time.perf_counter()
        try:
            return execute(plan)
        finally:
            steps[-1]["forward_seconds"] = time.perf_counter() - t0

    def recording():
        out = schedule()
        prompt = sum(n for req, n in out.scheduled if n > 1)
        decode = sum(1 for req, n in out.scheduled if n == 1)
        adapters = len({req.adapter for req, _ in out.scheduled if req.adapter})
        steps.append({"prompt_rows": prompt, "decode_rows": decode, "adapters": adapters,
                      "forward_seconds": 0.0})
        return out

    scheduler.schedule, engine._execute = recording, timed_execute
    try:
        times: list[float] = []
        seconds = replay(engine, trace, times.append)
    finally:
        del scheduler.schedule, engine._execute  # the bound methods again
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
    ap.add_argument("--rounds", type=int, default=3, help="timed replays (the median one is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out/trace_steps.json")
    args = ap.parse_args()

    llm = LLM(adapter_dir=args.adapter_dir, preload_adapters=bool(args.adapter_dir))
    engine, cfg = llm.engine, llm.engine.model_config
    names = llm.adapters()[:100] if args.adapter_dir else None
    # The host's load moves the matmul rates by 10-20% within minutes: they are measured before,
    # between and after the replays, and the floor is computed at the best of each.
    measured = [rates_now(cfg)]
    replay(engine, Trace.draw(-1, names=names, dist=args.dist))  # warm-up: kernels, pool, adapters
    runs = []
    for r in range(args.rounds):
        runs.append(record_steps(engine, Trace.draw(args.seed + r, names=names, dist=args.dist)))
        measured.append(rates_now(cfg))
    seconds, steps = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    trace = Trace.draw(args.seed, names=names, dist=args.dist)
    ops = op_seconds(engine, trace)
    measured.append(rates_now(cfg))
    rates = {key: max(m[key] for m in measured) for key in measured[0]}

    lin, head = weights_per_row(cfg)
    rows = sum(s["prompt_rows"] + s["decode_rows"] for s in steps)
    prompt_rows = sum(s["prompt_rows"] for s in steps)
    sampled = trace.output_tokens  # every token out comes from one row through the head
    flops = 2 * (rows * lin + sampled * head)
    # The prompt rows at the 2048-row rate, the one-token rows at the 256-row rate.
    one_token_rows = rows - prompt_rows
    floor = (2 * lin * (prompt_rows / rates["projections 2048"] + one_token_rows / rates["projections 256"])
             + 2 * head * sampled / rates["head 256"]) / 1e9
    forward = sum(s["forward_seconds"] for s in steps)
    by_class = summarize(steps)

    label = f"100 adapters ({args.dist})" if names else "base model"
    print(f"the trace offline, {label}: {len(trace.prompts)} requests, {trace.output_tokens} tokens out "
          f"in {seconds:.2f} s ({trace.output_tokens / seconds:.1f} tok/s; median of "
          f"{[round(r[0], 2) for r in runs]}), {len(steps)} steps, {torch.get_num_threads()} threads; "
          f"the forward passes {forward:.2f} s of the steps' {sum(s['seconds'] for s in steps):.2f} s")
    print("\n| steps | count | prompt rows | one-token rows | seconds | ms per row | adapters per step |")
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
    print("bfloat16 matmuls alone, GFLOP/s (best of before, between and after the replays): " +
          ", ".join(f"{key} rows {g:.0f}" for key, g in rates.items()))
    print(f"floor at those rates: {floor:.2f} s for the arithmetic alone, "
          f"{trace.output_tokens / floor:.0f} tok/s; the replay took {seconds / floor:.2f}x that")
    write_json(args.out, {"args": vars(args), "threads": torch.get_num_threads(), "seconds": seconds,
                          "runs": [r[0] for r in runs], "forward_seconds": forward, "steps": steps,
                          "by_class": by_class, "op_seconds": ops, "matmul_gflops": rates,
                          "matmul_gflops_each_time": measured, "flops": flops, "floor_seconds": floor})


if __name__ == "__main__":
    main()
