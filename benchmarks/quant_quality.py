"""Quality and decode speed of each --quantization mode against the unquantized model, one run.

    python benchmarks/quant_quality.py [--modes none int8 q4] [--batches 1 16] [--threads 1]

Perplexity: the fixed English text in benchmarks/quant_text.txt, teacher-forced through slserve's
own forward (one prefill of the whole text, logits at every position), under float32, bfloat16
where this CPU computes it natively, and each quantization mode on top of the serving dtype.
transformers' float32 perplexity of the same tokens is printed beside them as an independent
check of the pipeline. Decode throughput: batches of --prompt-len-token prompts generating
exactly --gen-len tokens each (offline API). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from bench_json import write_json

from slserve import LLM, SamplingParams
from slserve.config import cpu_has_native_bf16
from slserve.model.loader import resolve_model
from slserve.plan import StepPlan

TEXT = Path(__file__).with_name("quant_text.txt")


def slserve_nll(llm: LLM, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] given their prefixes: one prefill of the whole text
    on the engine's runner, logits at every position, KV in the pool's first pages (nothing else
    is running)."""
    page_tokens = llm.engine.config.page_tokens
    n = len(ids)
    pages = list(range(-(-n // page_tokens)))
    plan = StepPlan(
        input_ids=ids, positions=list(range(n)),
        slot_pages=[p // page_tokens for p in range(n)], slot_offsets=[p % page_tokens for p in range(n)],
        query_lens=[n], context_lens=[n], block_tables=[pages], logits_index=list(range(n - 1)),
    )
    # The logits come in the serving dtype: widened first, or the loss itself is computed, and
    # rounded, in bfloat16 (steps of 1/64 in a loss of ~3.2: 1.6% in perplexity).
    logits = llm.engine.runner.execute(plan).double()  # [n - 1, vocab]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()


def hf_nll(ids: list[int]) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()


def decode_tok_s(llm: LLM, batch: int, prompt_len: int, gen_len: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed + batch)
    prompts = torch.randint(100, llm.tokenizer.vocab_size, (batch, prompt_len), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t
    assert all(len(o.token_ids) == gen_len for o in outs)
    return batch * gen_len / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", nargs="+", default=["none", "int8", "q4"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/quant_quality.json")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    dtypes = ["float32"] + (["bfloat16"] if cpu_has_native_bf16() else [])
    rows = []
    ids = None
    for dtype in dtypes:
        for mode in args.modes:
            llm = LLM(dtype=dtype, quantization=None if mode == "none" else mode, pool_bytes=512 << 20,
                      threads=args.threads)
            if ids is None:
                ids = llm.tokenizer.encode(TEXT.read_text())
            nll = slserve_nll(llm, ids)
            decode_tok_s(llm, 2, 8, 4, args.seed)  # warm-up
            speed = {b: decode_tok_s(llm, b, args.prompt_len, args.gen_len, args.seed) for b in args.batches}
            rows.append({"dtype": dtype, "quantization": mode, "nll": nll, "perplexity": math.exp(nll),
                         "decode_tok_s": speed})
            del llm
    ref = hf_nll(ids)

    print(f"text: {TEXT.name}, {len(ids)} tokens; transformers float32 perplexity {math.exp(ref):.3f}")
    cols = "".join(f"{f'tok/s b={b}':>12}" for b in args.batches)
    print(f"{'dtype':9} {'quantization':>12} {'perplexity':>11} {'vs float32':>11}{cols}")
    base = rows[0]["perplexity"]
    for r in rows:
        speeds = "".join(f"{r['decode_tok_s'][b]:>12.1f}" for b in args.batches)
        print(f"{r['dtype']:9} {r['quantization']:>12} {r['perplexity']:>11.3f} "
              f"{r['perplexity'] / base - 1:>+10.2%}{speeds}")
    write_json(args.out, {"args": vars(args), "tokens": len(ids), "transformers_float32_nll": ref,
                          "torch_threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
