"""Scaling curve: throughput and TTFT of one server at a series of concurrent streams.

Each point is a closed loop of C streams (load_test.py --concurrency C): every stream sends the
trace's next request as soon as its last one ends, so C requests are always open. The trace is
load_test's workload (exact prompt and output lengths, adapters by popularity), the same for every
server; each point draws its own prompts (seed + C), so that no point finds an earlier point's
prompts in a server's prefix cache. Each server is measured by its own invocation (or one point
at a time with --points C --append, as scaling_rounds.sh does); --plot draws any number of the
JSON files side by side.

    python benchmarks/scaling.py --base-url http://127.0.0.1:8000 --adapters lora-/100 \\
        --popularity zipf --label "slserve, 100 adapters" --out benchmarks/results/scaling-slserve.json
    python benchmarks/scaling.py --base-url http://127.0.0.1:8011 --adapters none \\
        --label "vLLM-CPU, base model" --out benchmarks/results/scaling-vllm.json
    python benchmarks/scaling.py --plot benchmarks/results/scaling.png \\
        benchmarks/results/scaling-slserve.json benchmarks/results/scaling-vllm.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import (  # noqa: E402
    LoadTestConfig,
    add_workload_args,
    make_trace,
    run_load_test,
    workload_from_args,
)

log = logging.getLogger("scaling")
POINTS = (1, 8, 32, 64, 128, 256)


def point_requests(streams: int, per_stream: float, minimum: int) -> int:
    """Requests sent at one point: enough for every stream to send `per_stream` of them."""
    return max(minimum, round(streams * per_stream))


def run_point(a: argparse.Namespace, streams: int) -> dict:
    workload = replace(
        workload_from_args(a),
        rate=float("inf"),
        num_requests=point_requests(streams, a.per_stream, a.min_requests),
        seed=a.seed + streams,
    )
    cfg = LoadTestConfig(
        workload=workload, base_url=a.base_url, timeout=a.timeout, concurrency=streams, progress=False
    )
    result = asyncio.run(run_load_test(cfg, make_trace(workload)))
    s = result["summary"]
    return {
        "streams": streams,
        "requests": s["num_requests"],
        "completed": s["completed"],
        "errors": s["errors"],
        "output_tok_per_s": s["output_token_throughput"],
        "ttft_p50_s": s["ttft_s"]["p50"],
        "ttft_p99_s": s["ttft_s"]["p99"],
        "tpot_mean_s": s["tpot_s"]["mean"],
        "duration_s": s["duration_s"],
    }


def measure(a: argparse.Namespace) -> dict:
    points = []
    for c in a.points:
        p = run_point(a, c)
        points.append(p)
        log.info(
            "%4d streams: %4d/%d done  %7.1f out tok/s  TTFT p50 %6.2f s  p99 %6.2f s",
            c,
            p["completed"],
            p["requests"],
            p["output_tok_per_s"],
            p["ttft_p50_s"] or 0,
            p["ttft_p99_s"] or 0,
        )
    return {
        "label": a.label,
        "base_url": a.base_url,
        "workload": vars(a) | {"points": a.points},
        "points": points,
    }


def merge(curve: dict, new: dict) -> dict:
    """`curve` with `new`'s points added, a point of the same streams replaced, in stream order."""
    points = {p["streams"]: p for p in curve["points"]} | {p["streams"]: p for p in new["points"]}
    streams = sorted(points)
    workload = new["workload"] | {"points": streams}
    return new | {"workload": workload, "points": [points[s] for s in streams]}


def markdown(curves: list[dict]) -> str:
    lines = [
        "| system | streams | done | out tok/s | TTFT p50 (s) | TTFT p99 (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in curves:
        for p in c["points"]:
            lines.append(
                f"| {c['label']} | {p['streams']} | {p['completed']}/{p['requests']} "
                f"| {p['output_tok_per_s']:.1f} | {p['ttft_p50_s'] or 0:.2f} | {p['ttft_p99_s'] or 0:.2f} |"
            )
    return "\n".join(lines)


def plot(curves: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(12, 4.5))
    for c in curves:
        xs = [p["streams"] for p in c["points"]]
        line = ax_t.plot(xs, [p["output_tok_per_s"] for p in c["points"]], marker="o", label=c["label"])[0]
        for q, marker, ls in (("p50", "o", "-"), ("p99", "x", "--")):
            ttft = [p[f"ttft_{q}_s"] for p in c["points"]]
            ax_l.plot(xs, ttft, marker=marker, ls=ls, color=line.get_color(), label=f"{c['label']} {q}")
    streams = sorted({p["streams"] for c in curves for p in c["points"]})
    for ax, ylabel in ((ax_t, "output tokens/s"), (ax_l, "TTFT (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(streams, [str(s) for s in streams])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_l.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--label", default="server")
    p.add_argument("--points", type=int, nargs="+", default=list(POINTS), help="concurrent streams")
    p.add_argument("--per-stream", type=float, default=2.0, help="requests per stream at each point")
    p.add_argument("--min-requests", type=int, default=16, help="fewest requests at a point")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", default="", help="JSON result path")
    p.add_argument("--append", action="store_true",
                   help="merge the points into --out's curve (a point of the same streams is replaced)")
    p.add_argument("--plot", default=None, help="PNG path: draw the JSON files given as arguments")
    p.add_argument("curves", nargs="*", help="with --plot: scaling JSON files")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if a.plot:
        curves = [json.loads(Path(f).read_text()) for f in a.curves]
        plot(curves, a.plot)
        print(markdown(curves))
        print(f"wrote {a.plot}")
        return
    a.num_requests = a.num_requests or 1  # the real count is set per point
    result = measure(a)
    print(markdown([result]))
    if a.out:
        out = Path(a.out)
        if a.append and out.exists():
            result = merge(json.loads(out.read_text()), result)
        out.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
