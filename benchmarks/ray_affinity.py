"""Adapter-affine routing vs round-robin on slserve's Ray deployment, in one run.

One local Ray cluster; for each routing policy in turn, `slserve.deploy.ray_app` with N engine
replicas is deployed, the same power-law trace over M adapters is replayed through the ingress by
load_test.py, and the ingress's /metrics (every replica's counters, labelled by replica) give:

    adapter loads per 100 requests, host tier    an adapter read from disk and parsed into RAM
    adapter loads per 100 requests, device tier  an adapter copied into the replica's pool pages
    requests per replica                         how the policy split the trace

Policies (slserve/deploy/routing.py): `affinity` sends an adapter's requests to a replica that
holds it (Ray Serve's multiplexing); `round_robin` sends each request to the next replica. The
adapters are real PEFT-format adapters from make_adapters.py, placed in the deployment's shared
adapter directory before it starts. Run from the repository root:

    PYTHONPATH=$PWD python benchmarks/ray_affinity.py --requests 200 --max-tokens 8 \\
        --out benchmarks/results/ray_affinity.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from bench_json import write_json
from load_test import LoadTestConfig, WorkloadConfig, adapter_names, make_trace, run_load_test
from make_adapters import AdapterSetConfig, make_adapters
from prometheus_client.parser import text_string_to_metric_families

import slserve
from slserve.config import EngineConfig
from slserve.deploy import RayConfig, ray_app

log = logging.getLogger("ray_affinity")

POLICIES = ("affinity", "round_robin")
PREFIX = "lora-"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_counters(url: str) -> dict[str, dict[str, float]]:
    """metric -> replica -> value, for the counters this benchmark reads."""
    wanted = {("slserve_adapter_loads_total", "host"): "host_loads",
              ("slserve_adapter_loads_total", "device"): "device_loads",
              ("slserve_replica_requests_total", None): "requests"}
    out: dict[str, dict[str, float]] = defaultdict(dict)
    text = httpx.get(f"{url}/metrics", timeout=60).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = wanted.get((s.name, s.labels.get("tier")))
            if key is not None:
                out[key][s.labels["replica"]] = s.value
    return out


def run_policy(policy: str, url: str, config: EngineConfig, args: argparse.Namespace, local_root: str,
               trace: list, workload: WorkloadConfig) -> dict[str, Any]:
    from ray import serve

    ray_config = RayConfig(replicas=args.replicas, replica_cpus=1, ingress_cpus=0.5, routing=policy,
                           local_adapter_root=local_root, app_name=f"bench-{policy}")
    t = time.perf_counter()
    serve.run(ray_app(config, ray_config), name=ray_config.app_name, route_prefix="/")
    log.info("%s: deployed in %.0f s", policy, time.perf_counter() - t)
    before = replica_counters(url)
    result = asyncio.run(run_load_test(LoadTestConfig(workload, base_url=url, progress=False), trace))
    after = replica_counters(url)
    serve.delete(ray_config.app_name)
    n = result["summary"]["num_requests"]

    def per_100(metric: str) -> float:
        delta = sum(after[metric].values()) - sum(before[metric].values())
        return 100.0 * delta / n

    requests = {r: after["requests"][r] - before["requests"].get(r, 0.0) for r in after["requests"]}
    return {
        "policy": policy,
        "summary": result["summary"],
        "host_loads_per_100": per_100("host_loads"),
        "device_loads_per_100": per_100("device_loads"),
        "requests_per_replica": sorted(requests.values(), reverse=True),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| routing | done | req/s | output tok/s | TTFT p50 (s) | E2E p99 (s) | host loads / 100 req "
             "| device loads / 100 req | requests per replica |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        s = r["summary"]
        cells = [r["policy"], f"{s['completed']}/{s['num_requests']}", f"{s['request_throughput']:.2f}",
                 f"{s['output_token_throughput']:.1f}", f"{s['ttft_s']['p50']:.2f}",
                 f"{s['e2e_s']['p99']:.2f}",
                 f"{r['host_loads_per_100']:.1f}", f"{r['device_loads_per_100']:.1f}",
                 " / ".join(f"{x:.0f}" for x in r["requests_per_replica"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=16.0, help="requests/s, Poisson")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="S-LoRA's power law: 1 is uniform, smaller is more skewed")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--pool-mib", type=int, default=192, help="per replica: KV + adapter pages")
    p.add_argument("--host-cache-mib", type=int, default=112, help="per replica: parsed adapters in RAM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/ray_affinity.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    import ray
    from ray import serve

    work = Path(tempfile.mkdtemp(prefix="ray-affinity-"))
    shared = work / "adapters"
    t = time.perf_counter()
    make_adapters(AdapterSetConfig(num=args.adapters, out=str(shared), ranks=(args.rank,),
                                   targets=tuple(args.targets.split(",")), prefix=PREFIX, seed=args.seed,
                                   workers=1))
    (shared / "manifest.json").unlink()
    log.info("made %d adapters in %.0f s", args.adapters, time.perf_counter() - t)
    workload = WorkloadConfig(adapters=tuple(adapter_names(PREFIX, args.adapters)), popularity="power",
                              alpha=args.alpha, rate=args.rate, input_len=(args.input_len, args.input_len),
                              output_len=(args.max_tokens, args.max_tokens), num_requests=args.requests,
                              seed=args.seed)
    trace = make_trace(workload)

    # The replicas import the same slserve as this process, with one torch thread each.
    env = {"PYTHONPATH": str(Path(slserve.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    ray.init(address="local", num_cpus=args.replicas + 1, include_dashboard=False,
             object_store_memory=80 << 20, runtime_env={"env_vars": env}, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = EngineConfig(pool_bytes=args.pool_mib << 20, host_cache_bytes=args.host_cache_mib << 20,
                          threads=1, adapter_dir=str(shared), seed=args.seed)
    try:
        rows = [run_policy(policy, f"http://127.0.0.1:{port}", config, args, str(work / "local"), trace,
                           workload) for policy in POLICIES]
    finally:
        serve.shutdown()
        ray.shutdown()
    table = format_table(rows)
    print(table)
    write_json(args.out, {"config": {**vars(args), "dtype": config.dtype}, "workload": asdict(workload),
                          "table": table, "rows": rows})


if __name__ == "__main__":
    main()
