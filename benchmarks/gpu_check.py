"""The CUDA path end to end (Triton paged attention + Triton LoRA) against transformers + PEFT.

    python benchmarks/gpu_check.py --tokenizer DIR [--device cuda] [--out results/gpu_check.json]

Builds a random-weight Llama with SmolLM2's vocabulary (8 heads, 4 KV heads; shapes from the flags)
and real PEFT adapters of ranks 8-64 with different target sets, then
1. greedy tokens of one mixed batch (the base model and every adapter, several prompts each) from
   slserve against transformers + PEFT run one prompt at a time: float32 must match exactly;
   bfloat16 reports the share of prompts whose tokens match;
2. generation throughput of the engine (bfloat16) with every request on the base model, and with
   the requests spread over --adapters adapters of mixed ranks, in one run.
Prints a table and writes JSON. `--tokenizer` is a directory with SmolLM2's tokenizer files (no
hub access is needed or made). On a CPU-only machine `--device cpu` runs the same checks on the
torch path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_json import write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from peft_util import ALL_TARGETS, make_peft_adapter, peft_generate  # noqa: E402
from tiny_llama import write_tiny_llama  # noqa: E402

from slserve import LLM, SamplingParams  # noqa: E402

TARGET_SETS = (ALL_TARGETS, ["q_proj", "v_proj"], ["o_proj", "down_proj", "up_proj"], ["k_proj", "gate_proj"])
RANKS = (8, 16, 32, 64)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def parity(model_dir: Path, adapters: dict[str, Path], device: str, dtype: str, new_tokens: int) -> dict:
    """slserve's greedy tokens against transformers + PEFT in float32 and in the engine's dtype
    (on the same device): prompts whose tokens all match, and the mean matching prefix."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
               "1, 2, 3, 4,", "Translate to German: good morning"]
    work = [(p, a) for a in [None, *adapters] for p in prompts]
    llm = LLM(str(model_dir), dtype=dtype, device=device, pool_bytes=1 << 30,
              adapter_dir=str(model_dir.parent / f"store-{dtype}"))
    for name, path in adapters.items():
        llm.add_adapter(name, path)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate([tok.encode(p) for p, _ in work], params, adapters=[a for _, a in work])
    del llm
    row: dict = {"dtype": dtype, "prompts": len(work)}
    for ref_dtype in dict.fromkeys(("float32", dtype)):
        base = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=getattr(torch, ref_dtype))
        if ref_dtype != "float32":
            base = base.to(device)
        prefixes = []
        for (prompt, adapter), out in zip(work, outs, strict=True):
            path = adapters.get(adapter) if adapter else None
            ref = peft_generate(base, path, tok.encode(prompt), new_tokens, device=base.device)
            prefixes.append(common_prefix(out.token_ids, ref))
        row[f"vs_{ref_dtype}"] = {"matching": sum(p == new_tokens for p in prefixes),
                                  "mean_prefix": sum(prefixes) / len(prefixes)}
    return row


def throughput(model_dir: Path, adapters: dict[str, Path], device: str, requests: int,
               prompt_len: int, new_tokens: int) -> dict:
    llm = LLM(str(model_dir), dtype="bfloat16", device=device, pool_bytes=8 << 30,
              adapter_dir=str(model_dir.parent / "store-throughput"))
    for name, path in adapters.items():
        llm.add_adapter(name, path)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (prompt_len,), generator=g).tolist() for _ in range(requests)]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    names = list(adapters)
    result = {}
    for label, which in (("base", [None] * requests),
                         (f"{len(names)} adapters", [names[i % len(names)] for i in range(requests)])):
        llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=4), adapters=which[:8])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, adapters=which)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        result[label] = sum(len(o.token_ids) for o in outs) / dt
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_check.json")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 parity means IEEE float32 on both sides

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = write_tiny_llama(root, hidden=args.hidden, layers=args.layers, inter=args.intermediate,
                                     tokenizer_dir=args.tokenizer, std=0.05, tie=True, max_positions=4096)
        from transformers import LlamaForCausalLM

        base = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
        adapters = {}
        for i in range(args.adapters):
            name = f"r{RANKS[i % 4]}-{i}"
            adapters[name] = make_peft_adapter(base, root / name, RANKS[i % 4], TARGET_SETS[i % 4], seed=i,
                                               std=0.05)
        del base
        few = dict(list(adapters.items())[:4])
        rows = [parity(model_dir, few, args.device, dtype, args.new_tokens)
                for dtype in ("float32", "bfloat16")]
        speed = throughput(model_dir, adapters, args.device, args.requests, args.prompt_len, args.gen_len)

    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"{'check':<34}{'result':>16}")
    for r in rows:
        for ref in ("float32", "bfloat16"):
            if (m := r.get(f"vs_{ref}")) is not None:
                label = f"greedy {r['dtype']} vs HF {ref}"
                print(f"{label:<34}{m['matching']:>4} / {r['prompts']:<3}"
                      f" (mean prefix {m['mean_prefix']:.1f})")
    for label, tps in speed.items():
        print(f"{'generated tok/s, ' + label:<34}{tps:>16.0f}")
    write_json(args.out, {"device": name, "torch": torch.__version__, "args": vars(args) | {
        "tokenizer": str(args.tokenizer), "out": str(args.out)}, "parity": rows, "throughput": speed})


if __name__ == "__main__":
    main()
