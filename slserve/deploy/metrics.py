"""The ingress's /metrics: requests per replica counted at the ingress, and every replica's own
/metrics (gathered by a broadcast at scrape time) with a `replica` label on each sample."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from slserve.api.metrics import PREFIX


class ReplicaMetrics(Collector):
    """The families of several replicas' expositions, merged; set `texts` before each scrape."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}  # replica -> its /metrics text

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for replica, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                for s in family.samples:
                    labels = {**s.labels, "replica": replica}
                    merged.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
        yield from families.values()


class IngressMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(f"{PREFIX}_replica_requests", "Requests the ingress forwarded, by the "
                                "engine replica that took them.", ["replica"], registry=self.registry)
        self.lost = Counter(f"{PREFIX}_replica_lost_requests", "Requests that failed because their replica "
                            "died while serving them.", registry=self.registry)
        self.replicas = ReplicaMetrics()
        self.registry.register(self.replicas)

    def render(self, texts: dict[str, str]) -> bytes:
        self.replicas.texts = texts
        return generate_latest(self.registry)
