"""Where a decode step's time goes with many adapters: base model alone vs N adapters, one engine.

    python benchmarks/decode_step.py --adapter-dir /tmp/ad100 --adapters 100 --batch 96

Fills the engine with `batch` requests (64-token prompts) using no adapter, prefills them and
times decode steps; then the same with each request on an adapter drawn uniformly from the first
N. For the adapter case it also times the LoRA op calls inside the step and reports the bytes of
the distinct adapters the step reads, and the rate at which `sum()` reads the same bytes of the
pool (what these cores can stream). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from bench_json import write_json

from slserve import LLM, SamplingParams
from slserve.lora_batch import LoRABatch


def fill(engine, adapters: list[str | None], rng: random.Random, steps: int) -> list:
    """One request per entry of `adapters` (64-token prompts), prefilled and two steps decoded."""
    # Enough tokens that nobody finishes during the prefill steps and the timed steps.
    params = SamplingParams(max_tokens=steps + 64, ignore_eos=True, temperature=0)
    reqs = [engine.add_request([rng.randrange(100, 30000) for _ in range(64)], params, adapter)
            for adapter in adapters]
    while engine.scheduler.waiting or any(r.num_computed < r.num_tokens - 1 for r in reqs):
        engine.step()
    for _ in range(2):  # warm-up decode steps
        engine.step()
    return reqs


def timed_steps(engine, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter-dir", required=True)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out/decode_step.json")
    args = ap.parse_args()

    llm = LLM(adapter_dir=args.adapter_dir, preload_adapters=True)
    engine = llm.engine
    names = llm.adapters()[: args.adapters]
    rng = random.Random(args.seed)

    reqs = fill(engine, [None] * args.batch, rng, args.steps)
    base = timed_steps(engine, args.steps)
    for r in reqs:
        engine.abort(r.request_id)

    reqs = fill(engine, [rng.choice(names) for _ in range(args.batch)], rng, args.steps)
    lora_time = [0.0]
    apply = LoRABatch.apply

    def timed_apply(self, y, x, layer, group):
        t0 = time.perf_counter()
        apply(self, y, x, layer, group)
        lora_time[0] += time.perf_counter() - t0

    LoRABatch.apply = timed_apply
    try:
        with_lora = timed_steps(engine, args.steps)
    finally:
        LoRABatch.apply = apply
    distinct = {id(r.device_adapter): r.device_adapter for r in reqs if r.device_adapter is not None}
    pool, flat = engine.pool, engine.runner.flat
    lora_bytes = sum(d.num_pages for d in distinct.values()) * pool.page_elems * pool.itemsize
    span = flat[: lora_bytes // pool.itemsize]
    sum_times = []
    for _ in range(4):
        t0 = time.perf_counter()
        span.sum()
        sum_times.append(time.perf_counter() - t0)
    stream = lora_bytes / statistics.median(sum_times[1:])
    assert len(engine.scheduler.running) == args.batch, "every request ran through the timed steps"
    for r in reqs:
        engine.abort(r.request_id)

    lora_per_step = lora_time[0] / args.steps
    row = {
        "batch": args.batch, "adapters": len(names), "distinct_adapters_per_step": len(distinct),
        "base_step_ms": statistics.median(base) * 1e3, "lora_step_ms": statistics.median(with_lora) * 1e3,
        "lora_op_ms_per_step": lora_per_step * 1e3, "lora_bytes_per_step": lora_bytes,
        "lora_op_gb_s": lora_bytes / lora_per_step / 1e9, "sum_gb_s_same_bytes": stream / 1e9,
    }
    row["lora_over_base_throughput"] = row["base_step_ms"] / row["lora_step_ms"]
    dtype = str(engine.config.torch_dtype).removeprefix("torch.")
    print(f"decode step, {args.batch} requests, 64-token prompts, {dtype} "
          f"({len(distinct)} distinct adapters of {len(names)} in the step)")
    print(f"{'':34} {'median step (ms)':>17} {'tok/s':>8}")
    for label, key in (("base model only", "base_step_ms"), (f"{len(names)} adapters", "lora_step_ms")):
        print(f"{label:34} {row[key]:>17.1f} {args.batch / row[key] * 1e3:>8.0f}")
    print(f"LoRA op: {row['lora_op_ms_per_step']:.1f} ms per step reading {lora_bytes / 2**20:.0f} MiB "
          f"of adapter weights = {row['lora_op_gb_s']:.1f} GB/s "
          f"(sum() over the same bytes: {row['sum_gb_s_same_bytes']:.1f} GB/s)")
    write_json(args.out, {"args": vars(args), "dtype": dtype, "result": row})


if __name__ == "__main__":
    main()
