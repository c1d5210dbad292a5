"""``/metrics`` of a gateway with workers: every worker's metrics, labelled ``worker``.

Each worker keeps its own registry and serves it on a loopback port of its own, which it
tells the supervisor; the supervisor serves ``--metrics-listen`` and, at each scrape,
reads every live worker's metrics and adds a ``worker`` label (1 to N, kept by a
replacement). Summing over ``worker`` gives the gateway's totals; a replaced worker's
counters start again from zero, which Prometheus' ``rate()`` treats as a counter reset.
The supervisor adds its own ``order_gateway_workers`` and
``order_gateway_worker_restarts_total``.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

log = logging.getLogger("order_gateway.workers")

SCRAPE_TIMEOUT_SECONDS = 2.0


class WorkerMetricsCollector(Collector):
    """Collects the metrics of the workers ``ports()`` names (worker number → port)."""

    def __init__(self, ports: Callable[[], dict[int, int]]) -> None:
        self._ports = ports

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for worker, port in sorted(self._ports().items()):
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_SECONDS
                ) as response:
                    text = response.read().decode()
            except OSError as error:
                # A worker being replaced: its figures are missing from this scrape only.
                log.warning("cannot read worker %d's metrics: %s", worker, error)
                continue
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                merged.samples += [
                    Sample(s.name, {**s.labels, "worker": str(worker)}, s.value, s.timestamp)
                    for s in family.samples
                ]
        return list(families.values())


class SupervisorMetrics:
    def __init__(self, ports: Callable[[], dict[int, int]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(WorkerMetricsCollector(ports))
        self.workers = Gauge(
            "order_gateway_workers", "Worker processes serving now.", registry=self.registry
        )
        self.restarts = Counter(
            "order_gateway_worker_restarts",
            "Worker processes that exited while the gateway was serving, and were replaced.",
            registry=self.registry,
        )
