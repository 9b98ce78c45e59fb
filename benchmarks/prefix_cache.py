"""Automatic prefix caching on against off, same workload, one run.

    python benchmarks/make_adapters.py -n 4 --ranks 8 --out /tmp/ad4
    python benchmarks/prefix_cache.py --adapter-dir /tmp/ad4 [--num-requests 32 --system-tokens 512]

The workload of issue 13: every request starts with the same system prompt (--system-tokens) and
ends with a short question of its own; the requests cycle over --num-adapters adapters and the
base model, and all arrive at once. Two engines load the same model, one with prefix caching and
one without (--no-prefix-caching); the runs alternate between them for --rounds rounds, the cache
emptied before each run, so that every adapter computes the system prompt once per run. Reported:
TTFT percentiles, generated tokens/s and prompt tokens/s over the run's wall time, and the hit
rate. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from bench_json import write_json

from slserve import LLM, SamplingParams


def workload(llm: LLM, a: argparse.Namespace) -> list[tuple[list[int], str | None]]:
    rng = np.random.default_rng(0)
    vocab = llm.engine.model_config.vocab_size
    system = rng.integers(1000, vocab, a.system_tokens).tolist()
    identities = [*(f"{a.prefix}{i:04d}" for i in range(a.num_adapters)), None]
    return [(system + rng.integers(1000, vocab, a.question_tokens).tolist(), identities[i % len(identities)])
            for i in range(a.num_requests)]


def run(llm: LLM, work, max_tokens: int) -> dict:
    engine = llm.engine
    engine.reset_prefix_cache()
    before = dict(engine.counters)
    hits = engine.prefix_cache.stats.hit_tokens if engine.prefix_cache is not None else 0
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.monotonic()
    reqs = [engine.add_request(ids, params, adapter) for ids, adapter in work]
    while engine.has_unfinished():
        engine.step()
    wall = time.monotonic() - t0
    ttft = sorted(r.first_token_time - r.arrival for r in reqs)
    prompt = sum(r.num_prompt_tokens for r in reqs)
    hit = (engine.prefix_cache.stats.hit_tokens - hits) if engine.prefix_cache is not None else 0
    return {
        "prefix_caching": engine.prefix_cache is not None,
        "ttft_p50": ttft[len(ttft) // 2],
        "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "gen_tok_s": (engine.counters["generated_tokens"] - before["generated_tokens"]) / wall,
        "prompt_tok_s": prompt / wall,
        "hit_rate": hit / prompt,
        "steps": engine.counters["steps"] - before["steps"],
        "wall_s": wall,
        "outputs": [r.output_token_ids for r in reqs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter-dir", required=True)
    ap.add_argument("--prefix", default="lora-", help="adapter names: prefix + index (make_adapters.py)")
    ap.add_argument("--num-adapters", type=int, default=4)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--question-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pool-mib", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/prefix_cache.json")
    a = ap.parse_args()

    torch.manual_seed(0)
    common = dict(dtype=a.dtype, device=a.device, adapter_dir=a.adapter_dir, pool_bytes=a.pool_mib << 20,
                  preload_adapters=True)
    engines = {True: LLM(**common), False: LLM(**common, prefix_caching=False)}
    work = workload(engines[True], a)
    for llm in engines.values():
        run(llm, work[: a.num_adapters + 1], 2)  # warm-up: adapters resident, first-step costs
    runs = [run(engines[on], work, a.max_tokens) for _ in range(a.rounds) for on in (False, True)]
    same = all(r["outputs"] == runs[0]["outputs"] for r in runs)

    cols = ["ttft_p50", "ttft_p99", "gen_tok_s", "prompt_tok_s", "hit_rate"]
    summary = []
    for on in (False, True):
        mine = [r for r in runs if r["prefix_caching"] is on]
        summary.append({"prefix_caching": on, **{c: statistics.mean(r[c] for r in mine) for c in cols}})
    print(f"{a.num_requests} requests, {a.system_tokens}-token system prompt + {a.question_tokens} tokens, "
          f"{a.max_tokens} generated, over {a.num_adapters} adapters and the base model, "
          f"{engines[True].engine.config.dtype} on {a.device}, {a.rounds} rounds (means)")
    print(f"{'caching':>8} " + " ".join(f"{c:>14}" for c in cols))
    for s in summary:
        print(f"{'on' if s['prefix_caching'] else 'off':>8} " + " ".join(f"{s[c]:>14.3f}" for c in cols))
    off, on = summary
    print(f"on vs off: TTFT p50 {off['ttft_p50'] / on['ttft_p50']:.2f}x lower, "
          f"{on['gen_tok_s'] / off['gen_tok_s']:.2f}x generated tok/s; greedy outputs identical: {same}")
    for r in runs:
        del r["outputs"]
    write_json(a.out, {"config": vars(a), "dtype": engines[True].engine.config.dtype, "runs": runs,
                       "summary": summary, "outputs_identical": same, "ttft_unit": "s"})


if __name__ == "__main__":
    main()
