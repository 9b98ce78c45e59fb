"""Print the load-test tables of RESULTS.md from the JSON files in benchmarks/results/.

    python benchmarks/summarize_results.py [--dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = [
    ("slserve, base model only", "slserve-base"),
    ("slserve, 5 adapters", "slserve-lora5"),
    ("slserve, 100 adapters", "slserve-lora100"),
    ("PEFT, 5 adapters", "peft5"),
    ("PEFT, 100 adapters", "peft100"),
]
SATURATING = [
    ("slserve, base model only", "slserve-sat-base"),
    ("slserve, 100 adapters", "slserve-sat-lora100"),
    ("slserve, 100 adapters, none preloaded", "slserve-sat-lora100-cold"),
    ("PEFT, 100 adapters", "peft-sat100"),
]
SCALE = [("5 adapters", "slserve-scale5"), ("1000 adapters", "slserve-scale1000"),
         ("2000 adapters", "slserve-scale2000")]


def load(root: Path, name: str) -> dict | None:
    path = root / f"{name}.json"
    return json.loads(path.read_text())["summary"] if path.is_file() else None


def table(root: Path, rows: list[tuple[str, str]], relative_to: str | None = None) -> str:
    ref = load(root, relative_to) if relative_to else None
    head = ("| system | done | output tok/s | req/s | TTFT p50 (s) | TTFT p99 (s) | TPOT mean (ms) "
            "| E2E p99 (s) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    if ref:
        lines[0] = head[:-1] + f"| vs {relative_to} |"
        lines[1] += "---:|"
    for label, name in rows:
        s = load(root, name)
        if s is None:
            continue
        cells = [
            label, f"{s['completed']}/{s['num_requests']}", f"{s['output_token_throughput']:.1f}",
            f"{s['request_throughput']:.2f}", f"{s['ttft_s']['p50']:.2f}", f"{s['ttft_s']['p99']:.2f}",
            f"{s['tpot_s']['mean'] * 1e3:.0f}", f"{s['e2e_s']['p99']:.1f}",
        ]
        if ref:
            cells.append(f"{s['output_token_throughput'] / ref['output_token_throughput']:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="benchmarks/results")
    root = Path(ap.parse_args().dir)
    print(table(root, ROWS, relative_to="slserve-base"))
    print()
    print(table(root, SCALE, relative_to="slserve-scale5"))
    print()
    print(table(root, SATURATING, relative_to="slserve-sat-base"))


if __name__ == "__main__":
    main()
