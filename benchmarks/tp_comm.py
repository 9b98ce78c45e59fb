"""Tensor-parallel communication per step, measured against the formula, and TP=1 vs TP=2 speed.

    python benchmarks/tp_comm.py [--requests 16] [--max-tokens 32] [--out benchmarks/results/tp_comm.json]

A random-weight Llama (8 heads, 4 KV heads; SmolLM2's 9 heads do not split in two) is written by
transformers with the embedded model's tokenizer; PEFT adapters of ranks 16 and 64 on all seven
modules. The same workload runs at TP=1 and TP=2, without and with adapters. At TP=2 every
collective rank 0 takes part in is counted (payload elements x bytes, as handed to
torch.distributed) and set beside docs/ARCHITECTURE.md's formula evaluated on each step's plan:

    all-reduce  (2L + 1) T h              base: embedding, o_proj and down_proj of every layer
    all-reduce  sum over layers T (r_o + r_down)   LoRA: the row-parallel shrinks (max rank present)
    gather      N R ceil(V / N) float32   logits to rank 0

Prints a table and writes JSON. On a 2-core CPU expect no speed-up from TP=2: the point is the
communication volume and that it stays rank-sized for LoRA.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slserve import LLM, SamplingParams  # noqa: E402
from slserve.parallel import Collectives  # noqa: E402
from tests.peft_util import ALL_TARGETS, make_peft_adapter  # noqa: E402
from tests.tiny_llama import write_tiny_llama  # noqa: E402

PROMPTS = ["The quick brown fox", "In a distant galaxy", "def fibonacci(n):", "Bread starts with",
           "Once upon a time", "The capital of France is", "import numpy as np", "Dear sir or madam"]


class Counter:
    """Wraps the collectives of rank 0 (in this process) and the runner's execute."""

    def __init__(self):
        self.measured = {"all_reduce": 0, "gather": 0}
        self.formula = {"base": 0, "lora": 0, "gather": 0}
        self._all_reduce, self._gather = Collectives.all_reduce, Collectives.gather_vocab
        counter = self

        def all_reduce(self, t):
            if self.shard.parallel:
                counter.measured["all_reduce"] += t.numel() * t.element_size()
            return counter._all_reduce(self, t)

        def gather_vocab(self, local, vocab_size):
            if self.shard.parallel and local.shape[0]:
                width = -(-vocab_size // self.shard.size)
                counter.measured["gather"] += self.shard.size * local.shape[0] * width * local.element_size()
            return counter._gather(self, local, vocab_size)

        Collectives.all_reduce, Collectives.gather_vocab = all_reduce, gather_vocab

    def restore(self):
        Collectives.all_reduce, Collectives.gather_vocab = self._all_reduce, self._gather

    def watch(self, engine):
        """Count from now on (the warm-up before is not counted)."""
        self.measured = dict.fromkeys(self.measured, 0)
        cfg, runner = engine.model_config, engine.runner
        n, item = engine.config.tp, engine.config.torch_dtype.itemsize
        execute = runner.execute

        def counted(plan):
            T, R = plan.num_tokens, len(plan.logits_index)
            if T:
                self.formula["base"] += (2 * cfg.num_layers + 1) * T * cfg.hidden_size * item
                if R:
                    self.formula["gather"] += n * R * -(-cfg.vocab_size // n) * 4
            logits = execute(plan)  # applies the plan's loads first: every slot's table is known after
            if plan.segments:
                views = [runner.view(s.slot, s.rank) for s in plan.segments]
                tables = torch.stack([v.table for v in views])  # [S, L, G, F]
                ranks = tables[:, :, [1, 3], 1].amax(dim=0)  # [L, (o, down)]: max rank present
                self.formula["lora"] += int(ranks.sum()) * T * item
            return logits

        runner.execute = counted


def run(model_dir: Path, adapters: dict[str, Path], tp: int, use_lora: bool, args, store: Path) -> dict:
    # Wrapped before the model is built: the layers keep bound references to the collectives.
    counter = Counter() if tp > 1 else None
    llm = LLM(model=str(model_dir), dtype="float32", tp=tp, pool_bytes=256 << 20, adapter_dir=str(store))
    try:
        for name, path in adapters.items():
            llm.add_adapter(name, path)
        rng = random.Random(0)
        prompts = [rng.choice(PROMPTS) for _ in range(args.requests)]
        names = [rng.choice(list(adapters)) if use_lora else None for _ in prompts]
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(max_tokens=2), adapters=names[:2])  # warm-up
        if counter is not None:
            counter.watch(llm.engine)
        steps0 = llm.engine.counters["steps"]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, adapters=names)
        elapsed = time.perf_counter() - t0
        steps = llm.engine.counters["steps"] - steps0
        row = {"tp": tp, "lora": use_lora, "steps": steps, "tokens_out": sum(len(o.token_ids) for o in outs),
               "seconds": elapsed, "tok_per_s": sum(len(o.token_ids) for o in outs) / elapsed}
        if counter is not None:
            row["measured_bytes"] = counter.measured
            row["formula_bytes"] = counter.formula
        return row
    finally:
        if counter is not None:
            counter.restore()
        llm.engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/tp_comm.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = write_tiny_llama(root, hidden=args.hidden, layers=args.layers, inter=3 * args.hidden)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        adapters = {f"r{r}": make_peft_adapter(base, root / f"r{r}", r, ALL_TARGETS, seed=r)
                    for r in (16, 64)}
        del base
        rows = [run(model_dir, adapters, tp, lora, args, root / f"store-{tp}-{lora}")
                for lora in (False, True) for tp in (1, 2)]

    print(f"{'mode':<8}{'TP':>3}{'steps':>7}{'tok/s':>8}{'all-reduce MB':>15}{'formula MB':>12}"
          f"{'gather MB':>11}{'formula MB':>12}")
    for r in rows:
        mode = "lora" if r["lora"] else "base"
        line = f"{mode:<8}{r['tp']:>3}{r['steps']:>7}{r['tok_per_s']:>8.1f}"
        if "measured_bytes" in r:
            m, f = r["measured_bytes"], r["formula_bytes"]
            line += (f"{m['all_reduce'] / 1e6:>15.3f}{(f['base'] + f['lora']) / 1e6:>12.3f}"
                     f"{m['gather'] / 1e6:>11.3f}{f['gather'] / 1e6:>12.3f}")
        print(line)
    base2 = next(r for r in rows if r["tp"] == 2 and not r["lora"])
    lora2 = next(r for r in rows if r["tp"] == 2 and r["lora"])
    per_step = {k: r["measured_bytes"]["all_reduce"] / r["steps"]
                for k, r in (("base", base2), ("lora", lora2))}
    lora_share = lora2["formula_bytes"]["lora"] / lora2["steps"]
    print(f"all-reduce bytes per step at TP=2: base {per_step['base'] / 1e3:.1f} kB, with LoRA "
          f"{per_step['lora'] / 1e3:.1f} kB; LoRA's own share {lora_share / 1e3:.1f} kB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
