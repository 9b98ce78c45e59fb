"""Adapter-affine admission against first come first served, same trace, same engine, one run.

    python benchmarks/make_adapters.py -n 100 --ranks 8,16,32,64 --out /tmp/ad100
    python benchmarks/affinity.py --adapter-dir /tmp/ad100 [--bounds 0 32] [--rounds 2]

The trace is the saturating one of benchmarks/RESULTS.md (256 requests, Poisson at 32 req/s,
64-token prompts, 64 output tokens, zipf popularity over the adapters), replayed in wall-clock
time into one offline engine: before each step the requests whose arrival time has passed are
added. For each `affinity_bound` (0 is first come first served) it reports generated tokens/s,
distinct adapters per step, adapter bytes read per step (the weights of those adapters), TTFT
percentiles and the most times any request was overtaken. Runs alternate between the bounds,
with the device tier emptied before each, so that neither inherits the other's resident
adapters or the machine's quieter minutes. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from bench_json import write_json
from load_test import WorkloadConfig, adapter_names, make_trace

from slserve import LLM, SamplingParams


def replay(llm: LLM, trace, bound: int) -> dict:
    engine = llm.engine
    engine.scheduler.affinity_bound = bound
    engine.adapter_cache.evict_idle(engine.pool.num_pages)
    before = dict(engine.counters)
    pending = list(trace)
    reqs = []
    t0 = time.monotonic()
    while pending or engine.has_unfinished():
        now = time.monotonic() - t0
        while pending and pending[0].arrival_s <= now:
            item = pending.pop(0)
            params = SamplingParams(temperature=0, max_tokens=item.output_len, ignore_eos=True)
            req = engine.add_request(list(item.prompt_token_ids), params, item.adapter)
            reqs.append((t0 + item.arrival_s, req))
        if engine.has_unfinished():
            engine.step()
        elif pending:
            time.sleep(max(0.0, pending[0].arrival_s - (time.monotonic() - t0)))
    wall = time.monotonic() - t0
    steps = engine.counters["steps"] - before["steps"]
    generated = engine.counters["generated_tokens"] - before["generated_tokens"]
    ttft = sorted(req.first_token_time - arrival for arrival, req in reqs)
    return {
        "affinity_bound": bound,
        "tok_s": generated / wall,
        "steps": steps,
        "adapters_per_step": (engine.counters["step_adapters"] - before["step_adapters"]) / steps,
        "adapter_mb_per_step": (engine.counters["step_adapter_bytes"] - before["step_adapter_bytes"])
        / steps / 1e6,
        "ttft_p50": ttft[len(ttft) // 2],
        "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "max_overtaken": max(req.overtaken for _, req in reqs),
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter-dir", required=True)
    ap.add_argument("--num-adapters", type=int, default=100)
    ap.add_argument("--prefix", default="lora-",
                    help="adapter names: prefix + index, as make_adapters.py writes them")
    ap.add_argument("--bounds", type=int, nargs="+", default=[0, 32])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--rate", type=float, default=32.0)
    ap.add_argument("--popularity", default="zipf")
    ap.add_argument("--out", default="benchmarks/results/affinity.json")
    a = ap.parse_args()

    llm = LLM(adapter_dir=a.adapter_dir, preload_adapters=True)
    names = tuple(adapter_names(a.prefix, a.num_adapters))
    trace = make_trace(WorkloadConfig(adapters=names, popularity=a.popularity, alpha=1.0, rate=a.rate,
                                      num_requests=a.num_requests, seed=0), llm.tokenizer)
    replay(llm, trace[:16], 0)  # warm-up: first-step costs and allocator growth
    runs = [replay(llm, trace, bound) for _ in range(a.rounds) for bound in a.bounds]

    cols = ["tok_s", "adapters_per_step", "adapter_mb_per_step", "ttft_p50", "ttft_p99", "max_overtaken"]
    summary = []
    for bound in a.bounds:
        mine = [r for r in runs if r["affinity_bound"] == bound]
        summary.append({"affinity_bound": bound, **{c: statistics.mean(r[c] for r in mine) for c in cols}})
    print(f"{len(trace)} requests, {a.rate} req/s, {a.popularity} over {len(names)} adapters, "
          f"{a.rounds} rounds (means)")
    print(f"{'bound':>6} " + " ".join(f"{c:>20}" for c in cols))
    for s in summary:
        print(f"{s['affinity_bound']:>6} " + " ".join(f"{s[c]:>20.3f}" for c in cols))
    base = summary[0]
    for s in summary[1:]:
        print(f"bound {s['affinity_bound']} vs {base['affinity_bound']}: "
              f"{s['tok_s'] / base['tok_s']:.2f}x tok/s, "
              f"{s['adapter_mb_per_step'] / base['adapter_mb_per_step']:.2f}x adapter bytes per step")
    write_json(a.out, {"config": vars(a), "dtype": llm.engine.config.dtype, "runs": runs,
                       "summary": summary, "ttft_unit": "s", "numpy": np.__version__})


if __name__ == "__main__":
    main()
