"""The deployment's own settings (replicas, resources, routing); each replica's engine keeps its
EngineConfig. `slserve ray` maps its flags onto both one to one."""

from __future__ import annotations

from dataclasses import dataclass

# Routing policies by name; the classes live in routing.py (which needs Ray to import).
ROUTING_POLICIES = ("affinity", "round_robin")


@dataclass(frozen=True)
class RayConfig:
    """How many engine replicas, with what resources, and how requests reach them."""

    replicas: int = 2
    replica_cpus: float = 1.0  # Ray logical CPUs per engine replica
    replica_gpus: float | None = None  # None: EngineConfig.tp on a CUDA device, else 0
    ingress_cpus: float = 1.0
    # Requests one replica takes at once (its continuous batch and queue); above that Ray Serve
    # holds requests at the ingress and an adapter's requests spill to replicas without it.
    max_ongoing_requests: int = 64
    # Adapters a replica advertises to the router (Ray Serve's multiplexed-model LRU): a request
    # for one of them prefers that replica. It bounds routing only; the engine's own tiers decide
    # what stays in memory.
    adapters_per_replica: int = 64
    routing: str = "affinity"  # affinity | round_robin
    api_key: str | None = None
    admin_key: str | None = None
    # Where each replica keeps its local copy of the shared adapter directory (default: $TMPDIR).
    local_adapter_root: str | None = None
    app_name: str = "slserve"

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("replicas must be >= 1")
        if self.replica_cpus < 0 or self.ingress_cpus < 0:
            raise ValueError("replica_cpus and ingress_cpus must be >= 0")
        if self.replica_gpus is not None and self.replica_gpus < 0:
            raise ValueError("replica_gpus must be >= 0")
        if self.max_ongoing_requests < 1:
            raise ValueError("max_ongoing_requests must be >= 1")
        if self.adapters_per_replica < 1:
            raise ValueError("adapters_per_replica must be >= 1")
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {', '.join(ROUTING_POLICIES)}, got {self.routing!r}")
