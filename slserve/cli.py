"""Command line: `slserve generate "prompt"`, `slserve serve` and `slserve ray`. Flags map onto
EngineConfig (and, for `ray`, RayConfig) one to one."""

from __future__ import annotations

import argparse
import logging
import sys

from slserve.config import QUANTIZATIONS, EngineConfig
from slserve.deploy.config import ROUTING_POLICIES, RayConfig

MIB = 1 << 20


def _engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument("--model", default=None, help="local HF model directory (default: embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="auto: bfloat16 on GPUs and CPUs with native bfloat16 matmuls, else float32")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="quantize the base projections: int8 or q4 weights only, or w8a8 (int8 weights "
                   "and per-token int8 activations; fastest where the CPU has VNNI) (default: none)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--pool-mib", type=int, default=d.pool_bytes // MIB, help="unified KV + adapter pool")
    p.add_argument("--page-tokens", type=int, default=d.page_tokens)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-queue", type=int, default=d.max_queue)
    p.add_argument("--affinity-bound", type=int, default=d.affinity_bound, metavar="N",
                   help="admit requests whose adapter is already in the batch first; no request is "
                        "overtaken more than N times (0: first come first served)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="do not keep full KV pages for reuse by requests with the same prefix and adapter")
    p.add_argument("--adapter-dir", default=None, help="default: ~/.cache/slserve/adapters")
    p.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank)
    p.add_argument("--host-cache-mib", type=int, default=d.host_cache_bytes // MIB)
    p.add_argument("--preload-adapters", action="store_true",
                   help="parse adapters into host RAM at start-up, as many as the host cache holds")
    p.add_argument("--max-upload-mib", type=int, default=d.max_upload_bytes // MIB)
    p.add_argument("--tp", type=int, default=d.tp,
                   help="tensor-parallel ranks (worker processes on this machine)")
    p.add_argument("--tp-timeout", type=float, default=d.tp_timeout, metavar="SECONDS",
                   help="a tensor-parallel step that takes longer means a hung worker: the server stops")
    p.add_argument("--kernel-backend", default=d.kernel_backend, choices=["auto", "torch", "triton"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")


def engine_config(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=a.model, dtype=a.dtype, quantization=a.quantization, device=a.device, seed=a.seed,
        pool_bytes=a.pool_mib * MIB, page_tokens=a.page_tokens, max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=a.max_model_len,
        max_queue=a.max_queue, affinity_bound=a.affinity_bound, prefix_caching=a.prefix_caching,
        adapter_dir=a.adapter_dir, max_lora_rank=a.max_lora_rank,
        host_cache_bytes=a.host_cache_mib * MIB, preload_adapters=a.preload_adapters,
        max_upload_bytes=a.max_upload_mib * MIB, tp=a.tp, tp_timeout=a.tp_timeout,
        kernel_backend=a.kernel_backend, threads=a.threads,
        drain_timeout=getattr(a, "drain_timeout", EngineConfig.drain_timeout),  # `serve` and `ray`
    )


def _server_args(p: argparse.ArgumentParser) -> None:
    """What `serve` and `ray` share: where to listen, auth, the drain on stop."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="required as Bearer token on /v1 routes")
    p.add_argument("--admin-key", default=None, help="required on adapter write routes")
    p.add_argument("--drain-timeout", type=float, default=EngineConfig().drain_timeout, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long requests in flight may still run (then they end "
                        "with a 503 error)")


def _ray_args(p: argparse.ArgumentParser) -> None:
    d = RayConfig()
    p.add_argument("--address", default=None,
                   help="Ray cluster to deploy on (default: RAY_ADDRESS, else a cluster started with "
                        "`ray start` on this machine, else a new local one)")
    p.add_argument("--replicas", type=int, default=d.replicas, help="engine replicas (each one engine)")
    p.add_argument("--replica-cpus", type=float, default=d.replica_cpus, help="Ray CPUs per replica")
    p.add_argument("--replica-gpus", type=float, default=d.replica_gpus,
                   help="Ray GPUs per replica (default: --tp on CUDA, else 0)")
    p.add_argument("--ingress-cpus", type=float, default=d.ingress_cpus)
    p.add_argument("--max-ongoing-requests", type=int, default=d.max_ongoing_requests,
                   help="requests one replica takes at once; more wait at the ingress")
    p.add_argument("--adapters-per-replica", type=int, default=d.adapters_per_replica,
                   help="adapters a replica advertises to the router (Ray Serve's multiplexed-model LRU)")
    p.add_argument("--routing", default=d.routing, choices=ROUTING_POLICIES)
    p.add_argument("--local-adapter-root", default=None,
                   help="where each replica keeps its copy of the adapters (default: $TMPDIR)")
    p.add_argument("--app-name", default=d.app_name)


def ray_config(a: argparse.Namespace) -> RayConfig:
    return RayConfig(
        replicas=a.replicas, replica_cpus=a.replica_cpus, replica_gpus=a.replica_gpus,
        ingress_cpus=a.ingress_cpus, max_ongoing_requests=a.max_ongoing_requests,
        adapters_per_replica=a.adapters_per_replica, routing=a.routing, api_key=a.api_key,
        admin_key=a.admin_key, local_adapter_root=a.local_adapter_root, app_name=a.app_name,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="print a completion from the model")
    gen.add_argument("prompt")
    gen.add_argument("--adapter", default=None)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _engine_args(gen)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    _server_args(serve)
    serve.add_argument("--log-level", default="info")
    _engine_args(serve)

    ray_cmd = sub.add_parser("ray", help="serve engine replicas behind Ray Serve, routed by adapter "
                                     "(needs slserve[ray]); --adapter-dir is the shared adapter directory")
    _server_args(ray_cmd)
    _ray_args(ray_cmd)
    _engine_args(ray_cmd)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        return _generate(args)
    if args.command == "ray":
        from slserve.deploy import run

        run(engine_config(args), ray_config(args), address=args.address, host=args.host, port=args.port)
        return 0
    from slserve.api.server import run_server

    run_server(engine_config(args), host=args.host, port=args.port, api_key=args.api_key,
               admin_key=args.admin_key, log_level=args.log_level)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from slserve.engine import Engine
    from slserve.sampling_params import SamplingParams

    engine = Engine(engine_config(args))
    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    engine.add_request(prompt, params, args.adapter)
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
