"""Prometheus metrics, one CollectorRegistry per app.

Measured by the HTTP layer: request counts by route and status, TTFT, inter-token latency and
end-to-end latency. Read from engine.stats() at scrape time (EngineCollector): token counters,
running/waiting requests, pool pages by owner, adapters per tier, adapter loads and evictions,
the prefix cache's pages and hit rate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "slserve"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                    2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class EngineCollector(Collector):
    """Families derived from the latest engine.stats() snapshot (set right before each scrape)."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] | None = None

    def describe(self) -> list[Metric]:
        return []  # families depend on the snapshot; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        if s is None:
            return
        pool, store, device = s["pool"], s["adapters"]["store"], s["adapters"]["device"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def labelled(name: str, doc: str, label: str, values: dict[str, float]) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=[label])
            for key, value in values.items():
                family.add_metric([key], value)
            return family

        yield counter("prompt_tokens", "Prompt tokens of accepted requests.", s["prompt_tokens"])
        yield counter("generation_tokens", "Generated tokens.", s["generated_tokens"])
        yield counter("engine_steps", "Engine steps (forward passes).", s["steps"])
        yield counter("preemptions", "Requests preempted for lack of pool pages.", s["preemptions"])
        yield counter("step_adapters", "Distinct adapters summed over engine steps (divide by "
                      "engine_steps for the mean per step).", s["step_adapters"])
        yield counter("step_adapter_bytes", "Adapter weight bytes read, summed over engine steps.",
                      s["step_adapter_bytes"])
        yield gauge("num_requests_running", "Requests in the running batch.", s["running"])
        yield gauge("num_requests_waiting", "Requests waiting for admission.", s["waiting"])

        yield labelled("pool_pages", "Unified pool pages by owner.", "owner",
                       {"kv": pool["pages_kv"], "adapter": pool["pages_adapter"],
                        "prefix": pool["pages_prefix"], "free": pool["pages_free"]})
        prefix = s.get("prefix_cache")
        if prefix is not None:
            yield gauge("prefix_cache_pages", "KV pages held by the prefix cache (referenced or not).",
                        prefix["pages"])
            yield counter("prefix_cache_query_tokens", "Tokens of admitted requests looked up in the "
                          "prefix cache.", prefix["query_tokens"])
            yield counter("prefix_cache_hit_tokens", "Of those, tokens whose K/V came from the prefix "
                          "cache.", prefix["hit_tokens"])
            yield gauge("prefix_cache_hit_rate", "prefix_cache_hit_tokens / prefix_cache_query_tokens.",
                        prefix["hit_rate"])
        yield gauge("pool_pages_total", "Pages in the unified pool.", pool["pages_total"])
        yield gauge("pool_prefix_pages", "Adapter pages holding prefix-tuning keys and values (counted "
                    "among the adapter pages; shared by the adapter's running requests).",
                    pool.get("pages_adapter_prefix", 0))
        yield gauge("pool_page_bytes", "Bytes per pool page.", pool["page_bytes"])

        for name, doc, unit in (("adapters", "Adapters per tier.", "count"),
                                ("adapter_bytes", "Adapter bytes per tier.", "bytes")):
            yield labelled(name, doc, "tier", {"disk": store[f"disk_{unit}"], "host": store[f"host_{unit}"],
                                               "device": device[f"device_{unit}"]})

        loads = CounterMetricFamily(f"{PREFIX}_adapter_loads", "Adapter loads into a tier.", labels=["tier"])
        loads.add_metric(["host"], store["disk_loads"])
        loads.add_metric(["device"], device["loads"])
        yield loads
        evictions = CounterMetricFamily(f"{PREFIX}_adapter_evictions", "Adapter evictions from a tier.",
                                        labels=["tier"])
        evictions.add_metric(["host"], store["host_evictions"])
        evictions.add_metric(["device"], device["evictions"])
        yield evictions


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by route and status.",
                                ["route", "method", "status"], registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between streamed tokens.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_E2E_BUCKETS, registry=self.registry)
        self.engine = EngineCollector()
        self.registry.register(self.engine)

    def render(self, stats: dict[str, Any] | None) -> bytes:
        self.engine.stats = stats
        return generate_latest(self.registry)


class TokenTimer:
    """Per-request latency bookkeeping: call `tokens(n)` for each output, `finish()` at the end."""

    __slots__ = ("metrics", "start", "last")

    def __init__(self, metrics: ServerMetrics, start: float) -> None:
        self.metrics = metrics
        self.start = start
        self.last: float | None = None

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        t = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(t - self.start)
        else:
            # A step delivers one token per request; n > 1 only when several arrive together.
            gap = (t - self.last) / n
            for _ in range(n):
                self.metrics.itl.observe(gap)
        self.last = t

    def finish(self) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.start)


# Labels must come from bounded sets: anyone may send any method to any path, and every new label
# value is a series kept until the process ends.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


def method_label(scope: Scope) -> str:
    method = scope.get("method", "")
    return method if method in METHODS else "other"


def route_label(scope: Scope) -> str:
    """The template of the route that matched (e.g. /v1/adapters/{name}), never the raw path."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else UNMATCHED


class RequestCounter:
    """ASGI middleware counting responses by route template (not raw path) and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counted = False

        def count(status: int) -> None:
            nonlocal counted
            if not counted:
                counted = True
                self.metrics.requests.labels(route_label(scope), method_label(scope), str(status)).inc()

        async def send_counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        except BaseException:
            count(500)
            raise
