"""Host RAM per adapter: the parsed float32 copy against the host tier's copy (host_copy.py).

    python benchmarks/make_adapters.py -n 100 --ranks 8,16,32,64 --out /tmp/ad100
    python benchmarks/host_tier.py --adapter-dir /tmp/ad100 [--dtypes float32 bfloat16]

Parses every adapter of the folder once, keeps them all, and reports the bytes held (the
tensors' own sizes, and the process's resident memory growth measured from /proc) per adapter
and adapters per GiB, for the float32 parse and for the host copy kept when serving in each
dtype, each in a fresh process (so that freed memory from one does not hide the next one's
growth). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from bench_json import write_json

from slserve.adapters.host_copy import host_copy
from slserve.adapters.peft_format import load_peft_adapter
from slserve.config import DTYPES
from slserve.model.loader import load_model_config, resolve_model

GIB = 1 << 30


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(dirs: list[Path], serving: str | None) -> dict:
    """Parse and keep every adapter: as parsed (serving None) or as the host tier keeps it."""
    model = load_model_config(resolve_model(None))

    def keep(adapter):
        return adapter if serving is None else host_copy(adapter, DTYPES[serving])

    gc.collect()
    start, t0 = rss(), time.perf_counter()
    held = [keep(load_peft_adapter(d, model, 64, d.name)) for d in dirs]
    seconds = time.perf_counter() - t0
    grown = rss() - start
    tensor_bytes = sum(a.nbytes for a in held)
    del held
    gc.collect()
    n = len(dirs)
    return {"adapters": n, "tensor_bytes_per_adapter": tensor_bytes / n, "rss_bytes_per_adapter": grown / n,
            "adapters_per_gib": GIB * n / tensor_bytes, "parse_s_per_adapter": seconds / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter-dir", required=True)
    ap.add_argument("--limit", type=int, default=20, help="the first N adapters of the folder")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="serving dtypes")
    ap.add_argument("--out", default="benchmarks/results/host_tier.json")
    a = ap.parse_args()
    dirs = sorted(p for p in Path(a.adapter_dir).iterdir() if (p / "adapter_config.json").exists())[: a.limit]
    rows = {}
    for serving in (None, *a.dtypes):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            label = "parsed float32" if serving is None else f"host copy, serving {serving}"
            rows[label] = child.submit(measure, dirs, serving).result()
    print(f"{len(dirs)} adapters from {a.adapter_dir}")
    print(f"{'copy':<28} {'MB/adapter':>11} {'RSS MB/adapter':>15} {'adapters/GiB':>13} {'parse ms':>9}")
    for name, r in rows.items():
        print(f"{name:<28} {r['tensor_bytes_per_adapter'] / 1e6:>11.2f} "
              f"{r['rss_bytes_per_adapter'] / 1e6:>15.2f} "
              f"{r['adapters_per_gib']:>13.1f} {r['parse_s_per_adapter'] * 1e3:>9.1f}")
    write_json(a.out, {"adapter_dir": a.adapter_dir, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
