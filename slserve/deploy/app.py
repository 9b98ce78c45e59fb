"""The Ray Serve application: an ingress in front of N engine replicas (`ray_app`), and `run`,
which deploys it on a running Ray cluster or a new local one (`slserve ray`).

    HTTP -> Ray Serve proxy -> Ingress (ingress.py) --handle, multiplexed id = adapter-->
            EngineReplica x N (replica.py): slserve's app + one engine each (optionally a TP group)
    adapters: the shared directory EngineConfig.adapter_path (catalog.py), synced by each replica
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

try:
    import ray
    from ray import serve
except ImportError:  # pragma: no cover - the message is the point
    raise ImportError("slserve's Ray deployment needs Ray Serve: pip install 'slserve[ray]'") from None

from slserve.config import EngineConfig
from slserve.deploy.config import RayConfig
from slserve.deploy.ingress import Ingress
from slserve.deploy.replica import EngineReplica
from slserve.deploy.routing import router_options

logger = logging.getLogger(__name__)

ENGINE_DEPLOYMENT = "SlserveEngine"
INGRESS_DEPLOYMENT = "SlserveIngress"
# Multipart framing around an upload's two files (the files themselves get max_upload_bytes).
_BODY_SLACK = 64 << 10


def replica_gpus(config: EngineConfig, ray_config: RayConfig) -> float:
    """GPUs per replica: as configured, else one per TP rank on CUDA, else none."""
    if ray_config.replica_gpus is not None:
        return ray_config.replica_gpus
    return float(config.tp) if torch.device(config.device).type == "cuda" else 0.0


def ray_app(config: EngineConfig | None = None, ray_config: RayConfig | None = None) -> serve.Application:
    """The application to pass to `serve.run`: the ingress bound to the engine replicas. Every
    replica builds its engine from `config`; `config.adapter_path` is the shared adapter
    directory, which must be the same storage on every node."""
    config = config or EngineConfig()
    ray_config = ray_config or RayConfig()
    engines = serve.deployment(
        EngineReplica,
        name=ENGINE_DEPLOYMENT,
        num_replicas=ray_config.replicas,
        max_ongoing_requests=ray_config.max_ongoing_requests,
        ray_actor_options={"num_cpus": ray_config.replica_cpus, "num_gpus": replica_gpus(config, ray_config)},
        # Ray Serve's drain: a stopping replica finishes its requests for up to this long.
        graceful_shutdown_timeout_s=config.drain_timeout,
        **router_options(ray_config.routing),
    ).bind(config, ray_config)
    ingress = serve.deployment(
        Ingress,
        name=INGRESS_DEPLOYMENT,
        # Everything running on the replicas plus what waits for them.
        max_ongoing_requests=ray_config.replicas * ray_config.max_ongoing_requests + config.max_queue,
        ray_actor_options={"num_cpus": ray_config.ingress_cpus},
    )
    return ingress.bind(engines, config.max_upload_bytes + _BODY_SLACK)


def run(config: EngineConfig, ray_config: RayConfig, address: str | None = None, host: str = "127.0.0.1",
        port: int = 8000) -> None:
    """Deploy and serve until SIGINT or SIGTERM, then delete the application (its replicas finish
    their requests first). `address` None: the cluster in RAY_ADDRESS, else one started with
    `ray start` on this machine, else a new local one."""
    ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(ray_app(config, ray_config), name=ray_config.app_name, route_prefix="/")
    logger.info("serving %d replica(s) on http://%s:%d", ray_config.replicas, host, port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    logger.info("stopping: the replicas finish their requests (up to %g s)", config.drain_timeout)
    serve.delete(ray_config.app_name)
    ray.shutdown()
