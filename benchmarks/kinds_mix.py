"""Throughput of a saturating trace over adapters of every kind against the same trace over plain LoRA.

    python benchmarks/kinds_mix.py [--adapters 100] [--requests 100] [--gen-len 16] [--per-kind]

Two sets of --adapters real PEFT adapters for the embedded model: the mix cycles over the kinds
(LoRA, DoRA, AdaLoRA, VeRA and LongLoRA of rank 8 on all seven modules, IA3, prompt tuning and
prefix tuning with --virtual-tokens slots; the first of each made with the peft library, the rest
copies with every weight perturbed), and plain LoRA, a rank-8 LoRA on all seven modules in place of
each of them. The trace gives every request its adapter round-robin
and submits them all at once (offline, saturating: the batch holds every kind at every step);
each request generates exactly --gen-len tokens. --per-kind adds one run per kind, the trace over
--adapters adapters of that kind alone: the cost of each kind. The two sets alternate over --rounds runs, with
the device tier emptied before each (the host tier holds every adapter parsed). Reports
generated tokens/s and engine steps. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from bench_json import write_json

from slserve import LLM, SamplingParams
from slserve.model.loader import resolve_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]


def kind_configs(rank: int, virtual: int) -> dict:
    """name -> (peft config, std of the parameters whose names hold each key)."""
    from peft import (
        AdaLoraConfig,
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        VeraConfig,
    )

    pairs = {"lora_A": 0.05, "lora_B": 0.05}
    return {
        "lora": (LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS), pairs),
        "dora": (LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, use_dora=True), pairs),
        "adalora": (AdaLoraConfig(init_r=rank, total_step=10, target_modules=TARGETS),
                    {**pairs, "lora_E": 0.5}),
        "vera": (VeraConfig(r=rank, target_modules=TARGETS), {"vera_lambda_b": 0.1}),
        "longlora": (LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                modules_to_save=NORMS), pairs),
        "ia3": (IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                          feedforward_modules=["down_proj"]), {}),
        "prompt": (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual),
                   {"prompt_encoder": 0.02}),
        "prefix": (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual),
                   {"prompt_encoder": 0.1}),
    }


def derive(source: Path, path: Path, g: torch.Generator) -> Path:
    """A copy of a saved adapter with every weight perturbed (scalars, e.g. AdaLoRA's ranknum,
    kept): another adapter of the same kind and shapes."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, path)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * (1 + 0.1 * torch.randn(v.shape, generator=g)) if v.numel() > 1 else v
               for k, v in tensors.items()}, str(weights))
    return path


def make_sets(root: Path, model_dir: Path, rank: int, virtual: int, seed: int, count: int
              ) -> dict[str, dict[str, Path]]:
    """{"mix": name -> folder, "lora": name -> folder}, the same names in both. The plain LoRA set
    is one peft LoRA saved once, then copied with new random values for each name."""
    from peft import get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    pristine = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)

    def save(config, spread: dict[str, float], path: Path) -> Path:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(copy.deepcopy(pristine), config)  # peft changes the model it wraps
        with torch.no_grad():
            for pname, p in model.named_parameters():
                key = next((k for k in spread if k in pname), None)
                if key is not None:
                    p.copy_(torch.randn(p.shape, generator=g) * spread[key])
                elif "modules_to_save" in pname:  # trained norms: around the base weights
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
        model.save_pretrained(str(path))
        return path

    sets: dict[str, dict[str, Path]] = {"mix": {}, "lora": {}}
    configs = kind_configs(rank, virtual)
    kinds = list(configs)
    for i in range(count):
        kind = kinds[i % len(kinds)]
        name = f"{kind}-{i:03d}"
        first = sets["mix"].get(f"{kind}-{i % len(kinds):03d}")
        sets["mix"][name] = (derive(first, root / "mix" / name, g) if first is not None
                             else save(*configs[kind], root / "mix" / name))
    template = save(configs["lora"][0], configs["lora"][1], root / "lora-template")
    tensors = load_file(str(template / "adapter_model.safetensors"))
    for name in sets["mix"]:
        path = root / "lora" / name
        shutil.copytree(template, path)
        save_file({k: torch.randn(v.shape, generator=g) * 0.05 for k, v in tensors.items()},
                  str(path / "adapter_model.safetensors"))
        sets["lora"][name] = path
    return sets


def run(llm: LLM, prompts: list[list[int]], adapters: list[str], gen_len: int) -> dict:
    engine = llm.engine
    engine.adapter_cache.evict_idle(engine.pool.num_pages)
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    steps = engine.counters["steps"]
    t = time.perf_counter()
    outs = llm.generate(prompts, params, adapters=adapters)
    elapsed = time.perf_counter() - t
    assert all(len(o.token_ids) == gen_len for o in outs)
    assert engine.stats()["failed_steps"] == 0
    return {"tokens_per_s": len(prompts) * gen_len / elapsed, "seconds": elapsed,
            "steps": engine.counters["steps"] - steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=100, help="in each set")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--per-kind", action="store_true",
                    help="then one run per kind over --adapters adapters of that kind alone")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/kinds_mix.json")
    args = ap.parse_args()

    model_dir = resolve_model(None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        sets = make_sets(root, model_dir, args.rank, args.virtual_tokens, args.seed, args.adapters)
        made_s = time.perf_counter() - t
        names = list(sets["mix"])
        results: dict[str, list[dict]] = {"mix": [], "lora": []}
        llm = LLM(dtype=args.dtype, threads=args.threads or None, adapter_dir=str(root / "store"))
        try:
            vocab = llm.tokenizer.vocab_size
            g = torch.Generator().manual_seed(args.seed)
            prompts = torch.randint(100, vocab, (args.requests, args.prompt_len), generator=g).tolist()
            for which in ("mix", "lora"):
                for name, path in sets[which].items():
                    llm.add_adapter(f"{which}-{name}", path)
                    llm.engine.store.get(f"{which}-{name}")  # parsed before timing: the host tier is warm
            for _ in range(args.rounds):
                for which in ("mix", "lora"):
                    adapters = [f"{which}-{names[i % len(names)]}" for i in range(args.requests)]
                    results[which].append(run(llm, prompts, adapters, args.gen_len))
            if args.per_kind:  # the same trace over --adapters adapters of one kind, kind by kind
                g = torch.Generator().manual_seed(args.seed + 1)
                for k, kind in enumerate(kind_configs(args.rank, 1)):
                    first = sets["mix"][f"{kind}-{k:03d}"]
                    only = [f"only-{kind}-{i:03d}" for i in range(args.adapters)]
                    for name in only:
                        llm.add_adapter(name, derive(first, root / "only" / name, g))
                        llm.engine.store.get(name)
                    adapters = [only[i % len(only)] for i in range(args.requests)]
                    results[f"only-{kind}"] = [run(llm, prompts, adapters, args.gen_len)]
                    for name in only:  # the host tier holds one kind's set at a time
                        llm.remove_adapter(name)
        finally:
            llm.engine.close()

    summary = {w: statistics.median(r["tokens_per_s"] for r in rs) for w, rs in results.items()}
    print(f"{args.requests} requests x ({args.prompt_len} prompt + {args.gen_len} new tokens), {args.dtype}, "
          f"{len(names)} adapters per set, the mix over {', '.join(kind_configs(args.rank, 1))} "
          f"(rank {args.rank}, {args.virtual_tokens} virtual tokens)")
    print("| adapters | tok/s (median) | / plain LoRA | runs (tok/s) |")
    print("|---|---:|---:|---|")
    labels = {"mix": "every kind", "lora": "plain LoRA, rank 8"}
    for which in results:
        runs = ", ".join(f"{r['tokens_per_s']:.1f}" for r in results[which])
        label = labels.get(which, which.replace("only-", "only "))
        print(f"| {label} | {summary[which]:.1f} | {summary[which] / summary['lora']:.2f} | {runs} |")
    print(f"mix / plain LoRA: {summary['mix'] / summary['lora']:.2f}")
    write_json(args.out, {"config": vars(args), "adapters": names, "adapter_build_s": made_s,
                          "runs": results, "median_tokens_per_s": summary,
                          "mix_over_lora": summary["mix"] / summary["lora"]})


if __name__ == "__main__":
    main()
