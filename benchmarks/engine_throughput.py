"""Generated tokens/s of the engine against transformers' generate, same prompts, same run.

    python benchmarks/engine_throughput.py [--batches 1 8 32 64] [--dtypes float32 bfloat16]

Every prompt is exactly --prompt-len tokens; every request generates exactly --gen-len tokens
(ignore_eos here, min_new_tokens there). Also measures the machine's bf16 matmul peak and reports
the engine's model FLOP/s as a fraction of it. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_json import write_json

from slserve import LLM, SamplingParams
from slserve.model.loader import resolve_model


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def flops_per_token(cfg, context: float) -> float:
    """Matmul FLOPs of one decoded token: every projection, the LM head and attention."""
    per_layer = (
        cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size)
        + cfg.q_size * cfg.hidden_size
        + 3 * cfg.hidden_size * cfg.intermediate_size
        + 2 * cfg.num_heads * cfg.head_dim * context
    )
    return 2 * (cfg.num_layers * per_layer + cfg.hidden_size * cfg.vocab_size)


def make_prompts(tokenizer, batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Ordinary tokens only (ids past the special tokens), so every prompt is a real sequence.
    return torch.randint(100, tokenizer.vocab_size, (batch, length), generator=g).tolist()


def run_engine(llm: LLM, prompts, gen_len: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t
    assert all(len(o.token_ids) == gen_len for o in outs)
    return len(prompts) * gen_len / elapsed


def run_hf(model, prompts, gen_len: int) -> float:
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len, min_new_tokens=gen_len,
            do_sample=False, pad_token_id=0,
        )
    elapsed = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + gen_len
    return len(prompts) * gen_len / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out/engine_throughput.json")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    peak = matmul_peak(torch.bfloat16)
    rows = []
    for dtype in args.dtypes:
        llm = LLM(dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=getattr(torch, dtype))
        hf.eval()
        fpt = flops_per_token(llm.engine.model_config, args.prompt_len + args.gen_len / 2)
        run_engine(llm, make_prompts(llm.tokenizer, 2, 8, args.seed), 4)  # warm-up
        run_hf(hf, make_prompts(llm.tokenizer, 2, 8, args.seed), 4)
        for batch in args.batches:
            prompts = make_prompts(llm.tokenizer, batch, args.prompt_len, args.seed + batch)
            ours = run_engine(llm, prompts, args.gen_len)
            theirs = run_hf(hf, prompts, args.gen_len)
            rows.append({
                "dtype": dtype, "batch": batch, "slserve_tok_s": ours, "transformers_tok_s": theirs,
                "speedup": ours / theirs, "model_tflops": ours * fpt / 1e12,
                "fraction_of_bf16_peak": ours * fpt / peak,
            })
        del llm, hf

    header = f"{'dtype':9} {'batch':>5} {'slserve tok/s':>14} {'transformers tok/s':>19} {'speedup':>8} " \
             f"{'model TFLOP/s':>14} {'of bf16 peak':>13}"
    print(f"bf16 matmul peak (2048^3): {peak / 1e12:.2f} TFLOP/s")
    print(header)
    for r in rows:
        print(f"{r['dtype']:9} {r['batch']:>5} {r['slserve_tok_s']:>14.1f} {r['transformers_tok_s']:>19.1f} "
              f"{r['speedup']:>7.2f}x {r['model_tflops']:>14.3f} {r['fraction_of_bf16_peak']:>12.1%}")
    write_json(args.out, {"args": vars(args), "bf16_peak_flops": peak, "rows": rows})


if __name__ == "__main__":
    main()
