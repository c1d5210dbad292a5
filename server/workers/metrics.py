"""``/metrics`` of a gateway with workers: every worker's metrics, labelled ``worker``.

Each worker keeps its own registry and serves it on a loopback port of its own, which it
tells the supervisor; the supervisor serves ``--metrics-listen`` and, at each scrape,
reads every live worker's metrics and adds a ``worker`` label (1 to N, kept by a
replacement). Summing over ``worker`` gives the gateway's totals; a replaced worker's
counters start again from zero, which Prometheus' ``rate()`` treats as a counter reset.
The supervisor adds its own ``order_gateway_workers`` and
``order_gateway_worker_restarts_total``.

The supervisor reads its workers in OpenMetrics, whose families hold every sample of a
metric: a counter's ``_total`` and ``_created``, a histogram's ``_bucket``, ``_count``,
``_sum`` and ``_created``. Those families are the ones a worker's registry holds, so the
supervisor's registry exposes them as a single gateway would, in either format its
scraper asks for: OpenMetrics with ``_created`` inside each family, the classic text
format with ``_created`` as gauges of their own. (The classic format has no families
that span a counter and its ``_created``: read in it, every ``_created`` would come back
as a gauge family of its own, whose name clashes with its counter's in OpenMetrics.)
A ``name[]`` filter keeps the workers' series of those names, as it keeps the
supervisor's own.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import logging
import urllib.request
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger("order_gateway.workers")

SCRAPE_TIMEOUT_SECONDS = 2.0
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
"""What the supervisor asks its workers for (prometheus_client's server honours it)."""


def read_worker(port: int) -> list[Metric]:
    """The metric families a worker serves on ``port``, read in OpenMetrics.

    Raises ``OSError`` or ``http.client.HTTPException`` if the worker cannot be read, and
    ``ValueError`` if what it sent is not whole OpenMetrics (a worker that exited while
    it answered).
    """
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Accept": OPENMETRICS}
    )
    with urllib.request.urlopen(request, timeout=SCRAPE_TIMEOUT_SECONDS) as response:
        text = response.read().decode()
    # All of it now: the parser is lazy, and a truncated text fails at its end only.
    families: list[Metric] = list(text_string_to_metric_families(text))  # type: ignore[no-untyped-call]
    return families


def _read_or_error(port: int) -> list[Metric] | Exception:
    try:
        return read_worker(port)
    except (OSError, http.client.HTTPException, ValueError) as error:
        return error


class WorkerMetricsCollector(Collector):
    """Collects the metrics of the workers ``ports()`` names (worker number → port)."""

    def __init__(self, ports: Callable[[], dict[int, int]]) -> None:
        self._ports = ports

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        ports = sorted(self._ports().items())
        # All at once: one after the other, a scrape took the sum of the workers' answers
        # (each may wait up to a second for its consumer groups' figures from the store).
        with concurrent.futures.ThreadPoolExecutor(max(1, len(ports))) as pool:
            reads = list(pool.map(_read_or_error, (port for _, port in ports)))
        for (worker, _), read in zip(ports, reads, strict=True):
            if isinstance(read, Exception):
                # A worker being replaced: its figures are missing from this scrape only.
                log.warning("cannot read worker %d's metrics: %s", worker, read)
                continue
            for family in read:
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                # One worker's samples after another's: each series' samples (a
                # histogram's buckets, count, sum and created) stay together, as
                # OpenMetrics requires.
                merged.samples += [
                    s._replace(labels={**s.labels, "worker": str(worker)}) for s in family.samples
                ]
        return list(families.values())


class SupervisorMetrics:
    def __init__(self, ports: Callable[[], dict[int, int]]) -> None:
        # The workers' families are known only once read, so their collector has no names
        # to register: without this, prometheus_client's ``name[]`` filter, which picks
        # collectors by the names they registered, left every worker's family out.
        self.registry = CollectorRegistry(support_collectors_without_names=True)
        self.registry.register(WorkerMetricsCollector(ports))
        self.workers = Gauge(
            "order_gateway_workers", "Worker processes serving now.", registry=self.registry
        )
        self.restarts = Counter(
            "order_gateway_worker_restarts",
            "Worker processes that exited while the gateway was serving, and were replaced.",
            registry=self.registry,
        )
