"""HTTP serving overhead: the same batch through the offline API and through `slserve serve`.

32 fixed prompts of exactly 64 tokens each, 64 generated tokens each (ignore_eos, greedy,
bfloat16 by default). Offline: one `LLM.generate` call. HTTP: a `slserve serve` subprocess and 32
concurrent streaming /v1/completions requests (httpx). Both run in this one invocation, one after
the other (never at the same time), each after a warm-up, `--repeats` times alternately; the best
run of each counts. Target: HTTP tokens/s >= 85% of offline.

    python benchmarks/http_vs_offline.py --out benchmarks/out/http_vs_offline.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from bench_json import write_json

from slserve import LLM, SamplingParams

SEED = 0


def make_prompts(tokenizer, num: int, length: int, seed: int) -> list[list[int]]:
    """`num` prompts of exactly `length` token ids: seeded random slices of ordinary text tokens."""
    rng = np.random.default_rng(seed)
    text = (
        "The history of science is the study of the development of science and scientific knowledge, "
        "including both the natural and social sciences. Science is a body of empirical, theoretical, "
        "and practical knowledge about the natural world, produced by scientists who emphasize the "
        "observation, explanation, and prediction of real-world phenomena. "
    )
    ids = tokenizer.encode(text * 8)
    starts = rng.integers(0, len(ids) - length, size=num)
    return [ids[s : s + length] for s in starts]


def run_offline(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, [params] * len(prompts))
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed}


async def _one(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, t0: float) -> tuple[int, float]:
    body = {"model": None, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    tokens, ttft = 0, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            if '"usage":{' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return tokens, ttft or 0.0


async def run_http(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_one(client, p, max_tokens, t0) for p in prompts))
        elapsed = time.perf_counter() - t0
    tokens = sum(t for t, _ in results)
    return {"seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
            "mean_ttft_s": float(np.mean([t for _, t in results]))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, adapter_dir: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "slserve.cli", "serve", "--port", str(port), "--adapter-dir", adapter_dir,
           "--dtype", args.dtype, "--pool-mib", str(args.pool_mib), "--seed", str(SEED),
           "--device", args.device, "--log-level", "warning"]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--pool-mib", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads for both paths (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/out/http_vs_offline.json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args, str(Path(tmp) / "adapters"), Path(tmp) / "server.log")
        try:
            llm = LLM(dtype=args.dtype, device=args.device, pool_bytes=args.pool_mib << 20, seed=SEED,
                      adapter_dir=str(Path(tmp) / "offline-adapters"))
            prompts = make_prompts(llm.tokenizer, args.num_requests, args.prompt_len, SEED)
            params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
            # Warm-up both paths with a small batch.
            run_offline(llm, prompts[:4], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
            asyncio.run(run_http(url, prompts[:4], 4))
            offline_runs, http_runs = [], []
            for _ in range(args.repeats):
                offline_runs.append(run_offline(llm, prompts, params))
                http_runs.append(asyncio.run(run_http(url, prompts, args.output_len)))
        finally:
            proc.terminate()
            proc.wait(30)

    offline = max(offline_runs, key=lambda r: r["tokens_per_s"])
    http = max(http_runs, key=lambda r: r["tokens_per_s"])
    ratio = http["tokens_per_s"] / offline["tokens_per_s"]
    result = {
        "config": {**vars(args), "seed": SEED, "torch_threads": torch.get_num_threads(),
                   "cpu_count": os.cpu_count()},
        "offline": offline,
        "http": http,
        "offline_runs": offline_runs,
        "http_runs": http_runs,
        "http_over_offline": ratio,
        "target": 0.85,
        "meets_target": ratio >= 0.85,
    }
    print(f"{'path':<10}{'tokens':>8}{'seconds':>10}{'tokens/s':>11}")
    for name, r in (("offline", offline), ("http", http)):
        print(f"{name:<10}{r['tokens']:>8}{r['seconds']:>10.2f}{r['tokens_per_s']:>11.1f}")
    print(f"HTTP / offline = {ratio:.1%} (target >= 85%); all runs in {args.out}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
