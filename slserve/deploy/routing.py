"""How the ingress's handle picks an engine replica, by policy name (RayConfig.routing).

    affinity     Ray Serve's default router: power of two choices by queue length; a request with
                 a multiplexed model id (its adapter) goes to a replica that holds the adapter,
                 then to the replica holding the fewest, and to any replica once those stay full
                 past a short timeout. Base-model requests carry no id: the less loaded of two.
    round_robin  every request to the next replica in turn, adapters ignored: the baseline of
                 benchmarks/ray_affinity.py.
"""

from __future__ import annotations

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


class RoundRobinRouter(FIFOMixin, RequestRouter):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._turn = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # every replica full: wait, then retry
        if not candidate_replicas:
            return []
        ranked = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        start = self._turn % len(ranked)
        self._turn += 1
        # The next replica first; the rest in order, in case it refuses (full).
        return [[ranked[(start + k) % len(ranked)]] for k in range(len(ranked))]


# policy -> request router class (None: Ray Serve's default)
ROUTERS: dict[str, type[RequestRouter] | None] = {"affinity": None, "round_robin": RoundRobinRouter}


def router_options(policy: str) -> dict:
    """Deployment options that select the policy's router."""
    cls = ROUTERS[policy]
    return {} if cls is None else {"request_router_config": RequestRouterConfig(request_router_class=cls)}
