"""Throughput cost of structured outputs: constrained vs unconstrained requests, offline, one run.

    python benchmarks/structured_cost.py [--batch 8] [--gen-len 32] [--dtype bfloat16]

Every request generates exactly --gen-len tokens: the unconstrained ones with ignore_eos, the
constrained ones under JSON schemas that cannot be complete that early (an array of at least 1000
integers; a string of at least 1000 characters), so that each row decodes the same batch for the
same number of steps and only the grammar work differs. Rows: all unconstrained, all constrained
(each schema), half and half, and batch 1 of each. Also times compiling a schema (first time vs
cached) and the sampler alone on fixed logits, with and without constrained rows (the grammar's
own per-step cost, free of the forward's noise). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_json import write_json

from slserve import LLM, SamplingParams
from slserve.request import Request
from slserve.sampling_params import StructuredOutputsParams

SCHEMAS = {
    "int array": {"type": "array", "items": {"type": "integer"}, "minItems": 1000},
    "long string": {"type": "object", "properties": {"story": {"type": "string", "minLength": 1000}},
                    "required": ["story"]},
}


def make_prompts(tokenizer, batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, tokenizer.vocab_size, (batch, length), generator=g).tolist()


def run(llm: LLM, prompts, params: list[SamplingParams], gen_len: int) -> float:
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t
    assert all(len(o.token_ids) == gen_len for o in outs), [(len(o.token_ids), o.finish_reason) for o in outs]
    return len(prompts) * gen_len / elapsed


def sampler_ms(llm: LLM, batch: int, constrained: bool, reps: int = 20) -> float:
    """Mean time of one Sampler call on [batch, vocab] logits, every row greedy, each constrained
    row's matcher inside the int array (so the mask changes little between calls)."""
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0))
    reqs = [Request(f"r{i}", [1], SamplingParams(temperature=0)) for i in range(batch)]
    if constrained:
        for r in reqs:
            r.matcher = engine.grammars.matcher(StructuredOutputsParams(json=SCHEMAS["int array"]))
            r.matcher.accept_string("[12, 3")
    engine.sampler(logits, reqs)
    t = time.perf_counter()
    for _ in range(reps):
        engine.sampler(logits, reqs)
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1 on a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/structured_cost.json")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    llm = LLM(dtype=args.dtype, threads=args.threads, pool_bytes=512 << 20)
    grammars = llm.engine.grammars
    t = time.perf_counter()
    grammars.compile(StructuredOutputsParams(json=SCHEMAS["int array"]))
    compile_first = time.perf_counter() - t
    t = time.perf_counter()
    grammars.compile(StructuredOutputsParams(json=SCHEMAS["int array"]))
    compile_cached = time.perf_counter() - t

    def free(max_tokens: int = args.gen_len) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def constrained(schema: str, max_tokens: int = args.gen_len) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=max_tokens,
                              structured_outputs=StructuredOutputsParams(json=SCHEMAS[schema]))

    b = args.batch
    cases = {
        "unconstrained": [free() for _ in range(b)],
        **{f"all constrained ({name})": [constrained(name) for _ in range(b)] for name in SCHEMAS},
        "half constrained (int array)": [constrained("int array") if i % 2 else free() for i in range(b)],
        "batch 1, unconstrained": [free()],
        "batch 1, constrained (int array)": [constrained("int array")],
    }
    warm_up = [free(4), constrained("int array", 4)]
    run(llm, make_prompts(llm.tokenizer, 2, 8, args.seed), warm_up, 4)
    rows = []
    for name, params in cases.items():
        prompts = make_prompts(llm.tokenizer, len(params), args.prompt_len, args.seed)
        rows.append({"case": name, "batch": len(params), "tok_s": run(llm, prompts, params, args.gen_len)})
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["case"].endswith("unconstrained"))
        r["vs_unconstrained"] = r["tok_s"] / base["tok_s"]

    sampler = {"unconstrained_ms": sampler_ms(llm, b, False), "constrained_ms": sampler_ms(llm, b, True)}
    print(f"compile a schema: first {compile_first * 1e3:.1f} ms, cached {compile_cached * 1e6:.1f} us")
    print(f"sampler, {b} greedy rows: unconstrained {sampler['unconstrained_ms']:.2f} ms, "
          f"all constrained {sampler['constrained_ms']:.2f} ms per step")
    print(f"{'case':34} {'batch':>5} {'tok/s':>8} {'vs unconstrained':>17}")
    for r in rows:
        print(f"{r['case']:34} {r['batch']:>5} {r['tok_s']:>8.1f} {r['vs_unconstrained']:>16.1%}")
    write_json(args.out, {"args": vars(args), "compile_first_s": compile_first,
                          "compile_cached_s": compile_cached, "sampler_step": sampler, "rows": rows})


if __name__ == "__main__":
    main()
