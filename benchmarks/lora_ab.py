"""Two versions of the C++ LoRA op on the same step, alternated in one process.

    python benchmarks/lora_ab.py --adapter-dir /tmp/ad100 --before REV     # REV's op vs this tree's

A change to kernels/csrc/lora_cpu.cpp moves a server's throughput by a few percent, less than
this shared host drifts between two runs minutes apart. Here both versions are compiled side by
side (each under its own op namespace), one real step is captured from the engine (its pool,
slot tables and every (layer, group) call's activations): a decode step of `--batch` running
requests, or with `--phase prefill` the first step of as many new ones (prompt segments). The
two ops replay those calls in turn, round after round; their outputs must agree bit for bit.
Prints the median time per step of each and their ratio, and writes JSON. `--phase trace`
instead replays a whole trace of the side-by-side shape through the engine offline, once per
version per round, the engine's LoRA op swapped between runs: the change as the engine sees it,
without HTTP or a load generator sharing the cores.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from bench_json import write_json
from decode_step import fill
from trace_replay import Trace, draw_adapters
from trace_replay import replay as replay_trace

from slserve import LLM, SamplingParams
from slserve.config import cpu_march
from slserve.kernels.cpu_ext import build_flags
from slserve.lora_batch import LoRABatch
from slserve.memory.adapter_layout import GROUP_INDEX

CSRC = Path(__file__).resolve().parent.parent / "slserve" / "kernels" / "csrc"


def source_at(rev: str | None) -> str:
    """lora_cpu.cpp at a git revision, or as it is in the tree (None)."""
    if rev is None:
        return (CSRC / "lora_cpu.cpp").read_text()
    return subprocess.run(["git", "show", f"{rev}:slserve/kernels/csrc/lora_cpu.cpp"], cwd=CSRC, check=True,
                          capture_output=True, text=True).stdout


def build(source: str, namespace: str, workdir: Path):
    """Compile `source` (with this tree's headers) with its op registered under `namespace`."""
    d = workdir / namespace
    d.mkdir()
    for header in CSRC.glob("*.h"):
        shutil.copy(header, d)
    for macro in ("TORCH_LIBRARY_FRAGMENT(slserve,", "TORCH_LIBRARY_IMPL(slserve,"):
        assert macro in source, f"{macro} not found: the op's registration changed"
        source = source.replace(macro, macro.replace("slserve", namespace))
    (d / "lora_cpu.cpp").write_text(source)
    from torch.utils.cpp_extension import load

    load(name=namespace, sources=[str(d / "lora_cpu.cpp")], is_python_module=False,
         extra_cflags=build_flags(cpu_march()), build_directory=str(d))
    return getattr(torch.ops, namespace).lora_apply


def capture(llm: LLM, batch: int, dist: str, seed: int, phase: str) -> list[tuple]:
    """One step's LoRA calls, (batch state, y before the call, x, the call's slot rows): a decode
    step of `batch` running requests, or the first prefill step of `batch` new ones."""
    rng = random.Random(seed)
    adapters = draw_adapters(llm.adapters(), dist, batch, rng)
    if phase == "decode":
        fill(llm.engine, adapters, rng, 8)
    else:
        params = SamplingParams(max_tokens=1, temperature=0)
        for adapter in adapters:
            llm.engine.add_request([rng.randrange(100, 30000) for _ in range(64)], params, adapter)
    calls = []
    apply = LoRABatch.apply

    def recording(self, y, x, layer, group):
        calls.append((self, y.clone(), x.clone(), self.slots[layer][GROUP_INDEX[group]]))
        apply(self, y, x, layer, group)

    LoRABatch.apply = recording
    try:
        llm.engine.step()
    finally:
        LoRABatch.apply = apply
    return calls


def replay(op, calls: list[tuple]) -> tuple[float, list[torch.Tensor]]:
    ys = [y.clone() for _, y, _, _ in calls]
    t0 = time.perf_counter()
    for (state, _, x, slots), y in zip(calls, ys, strict=True):
        op(y, x, state.pool, state.bounds, slots)
    return time.perf_counter() - t0, ys


def trace_tok_s(llm: LLM, op, names: list[str], args, seed: int) -> float:
    """The side-by-side trace's shape replayed offline (trace_replay.py) with `op` as the engine's
    LoRA op: --batch requests at Poisson arrivals of --rate per second, adapters drawn by --dist.
    Output tokens/s."""
    trace = Trace.draw(seed, args.batch, args.rate, names, args.dist)
    backend = llm.engine.runner.backend
    backend.lora_op, own = op, backend.lora_op
    try:
        return trace.output_tokens / replay_trace(llm.engine, trace)
    finally:
        backend.lora_op = own


def trace_rounds(llm: LLM, ops: dict, args) -> None:
    names = llm.adapters()
    trace_tok_s(llm, ops["before"], names, args, seed=-1)  # warm-up: every adapter into the pool
    tok_s: dict[str, list[float]] = {k: [] for k in ops}
    for r in range(args.rounds):  # before, after; then after, before: no version always goes first
        for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
            tok_s[name].append(trace_tok_s(llm, ops[name], names, args, seed=args.seed + r))
    med = {k: statistics.median(v) for k, v in tok_s.items()}
    print(f"the trace offline: {args.batch} requests at {args.rate}/s ({args.dist}), 64 + 64 tokens, "
          f"{torch.get_num_threads()} threads; output tok/s")
    for name, rev in (("before", args.before), ("after", args.after or "tree")):
        label = f"{name} ({rev})"
        print(f"{label:24} {med[name]:>8.1f}   " + " ".join(f"{t:.1f}" for t in tok_s[name]))
    print(f"after / before (median of per-round ratios): "
          f"{statistics.median(a / b for a, b in zip(tok_s['after'], tok_s['before'], strict=True)):.3f}")
    write_json(args.out, {"args": vars(args), "threads": torch.get_num_threads(), "out_tok_s": tok_s})


def weight_bytes(calls: list[tuple]) -> int:
    """Bytes of adapter weights the step's calls read: every A and B^T once."""
    total = 0
    for _, _, _, slots in calls:
        for row in slots.tolist():
            if row[1]:
                total += row[1] * row[2] + sum(row[5 + 5 * e] * row[6 + 5 * e] for e in range(row[3]))
    return total * calls[0][0].pool.element_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter-dir", required=True)
    ap.add_argument("--before", default="HEAD", help="git revision of the first version")
    ap.add_argument("--after", default=None, help="git revision of the second (default: the tree as it is)")
    ap.add_argument("--phase", choices=["decode", "prefill", "trace"], default="decode")
    ap.add_argument("--rate", type=float, default=32.0, help="--phase trace: requests per second")
    ap.add_argument("--batch", type=int, default=256, help="requests (64-token prompts)")
    ap.add_argument("--dist", choices=["uniform", "zipf"], default="zipf")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3, help="replays per version per round (median kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out/lora_ab.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ops = {"before": build(source_at(args.before), "slserve_ab_before", Path(tmp)),
               "after": build(source_at(args.after), "slserve_ab_after", Path(tmp))}
    llm = LLM(adapter_dir=args.adapter_dir, preload_adapters=True)
    if args.phase == "trace":
        return trace_rounds(llm, ops, args)
    calls = capture(llm, args.batch, args.dist, args.seed, args.phase)
    state = calls[0][0]
    _, reference = replay(ops["before"], calls)
    _, other = replay(ops["after"], calls)
    assert all(torch.equal(a, b) for a, b in zip(reference, other, strict=True)), "the versions disagree"

    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(args.rounds):
        for name, op in ops.items():
            times[name].append(statistics.median(replay(op, calls)[0] for _ in range(args.reps)))
    nbytes = weight_bytes(calls)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = calls[0][2].shape[0]
    print(f"one {args.phase} step: {rows} rows of {args.batch} requests ({args.dist}), "
          f"{len(state.bounds)} segments, {len(calls)} calls, {nbytes / 1e6:.0f} MB of adapter weights, "
          f"{torch.get_num_threads()} threads")
    print(f"{'version':24} {'median ms':>10} {'GB/s':>6}   rounds (ms)")
    for name, rev in (("before", args.before), ("after", args.after or "tree")):
        runs = " ".join(f"{t * 1e3:.1f}" for t in times[name])
        label = f"{name} ({rev})"
        print(f"{label:24} {med[name] * 1e3:>10.1f} {nbytes / med[name] / 1e9:>6.1f}   {runs}")
    print(f"after / before: {med['after'] / med['before']:.3f}")
    write_json(args.out, {"args": vars(args), "weight_bytes": nbytes, "segments": len(state.bounds),
                          "threads": torch.get_num_threads(), "seconds": times,
                          "median_ratio": med["after"] / med["before"]})


if __name__ == "__main__":
    main()
