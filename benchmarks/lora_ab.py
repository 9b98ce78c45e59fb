"""Two versions of the C++ LoRA op on the same decode step, alternated in one process.

    python benchmarks/lora_ab.py --adapter-dir /tmp/ad100 --before REV     # REV's op vs this tree's

A change to kernels/csrc/lora_cpu.cpp moves a server's throughput by a few percent, less than
this shared host drifts between two runs minutes apart. Here both versions are compiled side by
side (each under its own op namespace), one real decode step of `--batch` requests over the
adapters is captured from the engine (its pool, slot tables and every (layer, group) call's
activations), and the two ops replay those calls in turn, round after round. Their outputs must
agree bit for bit. Prints the median time per step of each and their ratio, and writes JSON.
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

from slserve import LLM
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
         extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"], build_directory=str(d))
    return getattr(torch.ops, namespace).lora_apply


def capture(llm: LLM, batch: int, dist: str, seed: int) -> list[tuple]:
    """One decode step's LoRA calls: (batch state, y before the call, x, layer group index)."""
    names = llm.adapters()
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(len(names))] if dist == "zipf" else [1] * len(names)
    fill(llm.engine, rng.choices(names, weights=weights, k=batch), rng, 8)
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
    ap.add_argument("--batch", type=int, default=256)
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
    calls = capture(llm, args.batch, args.dist, args.seed)
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
    print(f"one decode step: {args.batch} requests ({args.dist}) over {len(state.bounds)} adapters, "
          f"{len(calls)} calls, {nbytes / 1e6:.0f} MB of adapter weights, {torch.get_num_threads()} threads")
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
