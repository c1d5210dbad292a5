"""The supervisor's ``/metrics``: every worker's metric families as the worker serves them,
each sample labelled ``worker``, and the supervisor's own, in both exposition formats.

The workers here are registries served in this process, as each worker serves its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import logging
import socket
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

import pytest
from prometheus_client import (
    CollectorRegistry,
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_classic

import server.workers.metrics as worker_metrics
from server.observability.metrics import GatewayMetrics, MetricsServer
from server.workers.metrics import SupervisorMetrics

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
"""What Prometheus asks for first (its default scrape protocols)."""

Parse = Callable[[str], Iterable[Metric]]


def openmetrics_families(text: str) -> list[Metric]:
    # prometheus_client's OpenMetrics modules have no annotations.
    return list(parse_openmetrics(text))  # type: ignore[no-untyped-call]


def classic_families(text: str) -> list[Metric]:
    return list(parse_classic(text))


def scrape(port: int, accept: str | None, query: str = "") -> tuple[str, str]:
    """``/metrics`` on ``port`` with this Accept header (and ``query``, as
    ``name[]=…``): its content type and text."""
    headers = {"Accept": accept} if accept else {}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics{'?' if query else ''}{query}", headers=headers
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.headers["Content-Type"]), str(response.read().decode())


@contextlib.asynccontextmanager
async def serving(registry: CollectorRegistry) -> AsyncIterator[int]:
    """``registry`` at ``/metrics`` on a port the system picks; that port."""
    server = MetricsServer(registry, "127.0.0.1:0")
    port = server.start()
    try:
        yield port
    finally:
        await server.stop()


def of_worker(families: Iterable[Metric], worker: str) -> dict[str, Metric]:
    """The families, by name, with one worker's samples alone and without their ``worker``
    label: what that worker served."""
    found = {}
    for family in families:
        mine = Metric(family.name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("worker", None) == worker:
                mine.samples.append(sample._replace(labels=labels))
        found[family.name] = mine
    return found


def record(metrics: GatewayMetrics, calls: int) -> None:
    """Counters, histograms and gauges with labels and without."""
    rpc = ("orders.v1.OrderCommandService", "CreateOrder", "unary")
    for n in range(calls):
        metrics.rpc_handled.labels(*rpc, "OK").inc()
        metrics.rpc_duration.labels(*rpc).observe(0.001 * n)
        metrics.append_batch.observe(n + 2)
    metrics.rpc_handled.labels(*rpc, "NOT_FOUND").inc()
    metrics.store_errors.labels("full").inc()
    metrics.store_fault.labels("full").set(1)


@pytest.fixture(params=["created", "no created"])
def created_series(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Both ways prometheus_client can run: with ``_created`` series (its default), and
    without (``PROMETHEUS_DISABLE_CREATED_SERIES``)."""
    if request.param == "no created":
        disable_created_metrics()  # type: ignore[no-untyped-call]
    yield request.param == "created"
    enable_created_metrics()  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    ("accept", "content_type", "parse", "expose"),
    [
        (OPENMETRICS, "application/openmetrics-text", openmetrics_families, generate_openmetrics),
        (None, "text/plain; version=0.0.4", classic_families, generate_latest),
    ],
    ids=["openmetrics", "classic"],
)
async def test_the_supervisor_serves_each_workers_families_labelled_in_either_format(
    created_series: bool,
    accept: str | None,
    content_type: str,
    parse: Parse,
    expose: Callable[[CollectorRegistry], bytes],
) -> None:
    workers = {"1": GatewayMetrics(), "2": GatewayMetrics()}
    record(workers["1"], calls=3)
    record(workers["2"], calls=5)
    async with serving(workers["1"].registry) as one, serving(workers["2"].registry) as two:
        supervisor = SupervisorMetrics(lambda: {1: one, 2: two})
        supervisor.workers.set(2)
        supervisor.restarts.inc()
        async with serving(supervisor.registry) as port:
            served_as, text = await asyncio.to_thread(scrape, port, accept)

    assert served_as.startswith(content_type)
    # The format's own parser (the OpenMetrics one is strict: it refuses, say, a family
    # named after a counter's `_created` series beside that counter's).
    families = {family.name: family for family in parse(text)}
    served = set()
    for worker, metrics in workers.items():
        # Each worker's families, types, help and samples (histograms' buckets, `_created`
        # series) as the worker serves them itself, labelled with its number.
        own = {family.name: family for family in parse(expose(metrics.registry).decode())}
        labelled = of_worker(families.values(), worker)
        assert {name: labelled[name] for name in own} == own
        served |= set(own)

    # And the supervisor's own, unlabelled.
    own = {family.name: family for family in parse(expose(supervisor_reference()).decode())}
    assert set(families) == served | set(own)
    for name, family in own.items():
        assert [s.labels for s in families[name].samples] == [s.labels for s in family.samples]
    assert [s.value for s in families["order_gateway_workers"].samples] == [2]
    restarts = families["order_gateway_worker_restarts"].samples
    assert [s.value for s in restarts if s.name.endswith("_total")] == [1]

    created = {s.name for f in families.values() for s in f.samples if s.name.endswith("_created")}
    if not created_series:
        assert created == set()
    else:
        assert {"grpc_server_handled_created", "order_gateway_worker_restarts_created"} <= created
        # OpenMetrics has a counter's `_created` in the counter's family; the classic format
        # has it as a gauge of its own.
        assert ("grpc_server_handled_created" in families) == (accept is None)


@pytest.mark.parametrize(
    ("accept", "parse"),
    [(OPENMETRICS, openmetrics_families), (None, classic_families)],
    ids=["openmetrics", "classic"],
)
async def test_a_name_filter_gives_the_workers_samples_of_that_name_as_one_process_would(
    accept: str | None, parse: Parse
) -> None:
    workers = {"1": GatewayMetrics(), "2": GatewayMetrics()}
    record(workers["1"], calls=3)
    record(workers["2"], calls=5)
    query = "name[]=grpc_server_handled_total&name[]=order_gateway_workers"
    async with serving(workers["1"].registry) as one, serving(workers["2"].registry) as two:
        supervisor = SupervisorMetrics(lambda: {1: one, 2: two})
        supervisor.workers.set(2)
        async with serving(supervisor.registry) as port:
            _, text = await asyncio.to_thread(scrape, port, accept, query)
        alone = {
            worker: await asyncio.to_thread(scrape, worker_port, accept, query)
            for worker, worker_port in (("1", one), ("2", two))
        }

    families = {family.name: family for family in parse(text)}
    assert set(families) == {"grpc_server_handled", "order_gateway_workers"}
    for worker, (_, own_text) in alone.items():
        # What each worker answers to the same filter, labelled with its number.
        own = {family.name: family for family in parse(own_text)}
        assert set(own) == {"grpc_server_handled"}
        assert (
            of_worker(families.values(), worker)["grpc_server_handled"]
            == own["grpc_server_handled"]
        )
    assert {s.name for s in families["grpc_server_handled"].samples} == {
        "grpc_server_handled_total"
    }
    assert [s.value for s in families["order_gateway_workers"].samples] == [2]


def supervisor_reference() -> CollectorRegistry:
    """The supervisor's own metrics, without any worker."""
    return SupervisorMetrics(dict).registry


class _Truncated(http.server.BaseHTTPRequestHandler):
    """A worker that exits as it answers: OpenMetrics without its end."""

    def do_GET(self) -> None:
        body = generate_openmetrics(GatewayMetrics().registry)  # type: ignore[no-untyped-call]
        body = body[: body.rindex(b"# EOF")]
        self.send_response(200)
        self.send_header("Content-Type", OPENMETRICS)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def truncating() -> Iterator[int]:
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Truncated) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            thread.join()


async def test_a_worker_that_cannot_be_read_is_left_out_of_that_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = GatewayMetrics()
    record(worker, calls=1)
    with (
        truncating() as truncated,
        # Bound, not listening: a connection is refused, as to a worker that has exited.
        socket.socket() as exited,
        caplog.at_level(logging.WARNING, "order_gateway.workers"),
    ):
        exited.bind(("127.0.0.1", 0))
        gone = exited.getsockname()[1]
        async with serving(worker.registry) as one:
            supervisor = SupervisorMetrics(lambda: {1: one, 2: truncated, 3: gone})
            async with serving(supervisor.registry) as port:
                _, text = await asyncio.to_thread(scrape, port, OPENMETRICS)

    samples = [s for family in openmetrics_families(text) for s in family.samples]
    assert {s.labels.get("worker") for s in samples} == {"1", None}
    messages = [entry.getMessage() for entry in caplog.records]
    assert [m.split(":")[0] for m in messages] == [
        "cannot read worker 2's metrics",
        "cannot read worker 3's metrics",
    ]
    assert "Missing # EOF" in messages[0]


def test_the_workers_are_read_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # One after the other, a scrape took the sum of the workers' answers. Each read here
    # waits until all three have begun: read one at a time, the first waits in vain.
    begun = threading.Barrier(3, timeout=5)

    def read_worker(port: int) -> list[Metric]:
        begun.wait()
        family = Metric("order_gateway_port", "The worker's port.", "gauge")
        family.add_sample("order_gateway_port", {}, port)
        return [family]

    monkeypatch.setattr(worker_metrics, "read_worker", read_worker)
    supervisor = SupervisorMetrics(lambda: {1: 101, 2: 102, 3: 103})
    samples = [
        (s.labels["worker"], s.value)
        for family in supervisor.registry.collect()
        if family.name == "order_gateway_port"
        for s in family.samples
    ]
    assert samples == [("1", 101), ("2", 102), ("3", 103)]
