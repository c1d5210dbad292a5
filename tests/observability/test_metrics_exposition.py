"""The gateway's metrics read exactly as prometheus_client's own Counter and Histogram
would read for the same observations: names, types, help, labels, buckets, values,
series order and ``_created`` series, in both exposition formats."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from domain.bus import Result
from domain.commands import CancelOrder, Command, RestockProduct
from domain.errors import (
    ConcurrencyConflictError,
    DuplicateCommandError,
    InsufficientInventoryError,
    ProductNotFoundError,
)
from domain.ports import Commit, NewEvent, RecordedEvent, recorded_events
from server.observability.hooks import RpcOutcome
from server.observability.metrics import (
    BATCH_BUCKETS,
    LAG_BUCKETS,
    LATENCY_BUCKETS,
    CommandMetricsMiddleware,
    GatewayMetrics,
    MeteredEventStore,
)
from server.stores.decorator import EventStoreDecorator
from server.stores.memory import MemoryEventStore

CREATED = 1_700_000_000.25
ORDERS = "/orders.v1.OrderCommandService"

# Durations at the buckets' bounds (which count in their own bucket), between them,
# beyond the last and at the edges.
DURATIONS = (0.0, 0.0005, 0.0007, 0.001, 0.003, 0.025, 0.5, 9.99, 10.0, 12.5, math.inf)


class Reference:
    """The gateway's metrics as prometheus_client's own types expose them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        rpc_labels = ("grpc_service", "grpc_method", "grpc_type")
        self.rpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            (*rpc_labels, "grpc_code"),
            registry=self.registry,
        )
        self.rpc_duration = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC's handler to its end (whole stream for streams).",
            rpc_labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.command_duration = Histogram(
            "order_gateway_command_seconds",
            "Command dispatch time through the bus (idempotent replays and retries included), "
            "by command type and outcome (ok, the domain error's reason, cancelled, or error).",
            ("command", "outcome"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.append_duration = Histogram(
            "order_gateway_store_append_seconds",
            "Time to append one command's events durably "
            "(outcome ok, conflict, duplicate, cancelled, error).",
            ("outcome",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.append_batch = Histogram(
            "order_gateway_store_append_events",
            "Events per committed append (one command's commit).",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.store_errors = Counter(
            "order_gateway_store_errors",
            "Store calls that failed, by kind: full (out of space), unavailable (cannot be "
            "reached, I/O error), other.",
            ("kind",),
            registry=self.registry,
        )
        self.store_fault = Gauge(
            "order_gateway_store_fault",
            "1 while the store is in a fault condition of this kind (full, unavailable).",
            ("kind",),
            registry=self.registry,
        )
        self.subscriptions = Gauge(
            "order_gateway_subscriptions",
            "Subscribe streams open now.",
            registry=self.registry,
        )
        self.subscription_lags = Histogram(
            "order_gateway_subscription_lag_events",
            "Committed head position minus the position a subscription (or a consumer "
            "group's reader) has delivered, observed each time it has sent a batch of "
            "events or a checkpoint.",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )

    def rpc(self, method: str, code: grpc.StatusCode, duration: float) -> None:
        labels = (method.lstrip("/").partition("/")[0], method.rpartition("/")[2], "unary")
        self.rpc_handled.labels(*labels, code.name).inc()
        self.rpc_duration.labels(*labels).observe(duration)


class Clock:
    """``time.perf_counter`` for the middleware and the store: each dispatch or append
    reads it at its start (0) and its end, and lasts the duration ``lasting`` set."""

    def __init__(self) -> None:
        self._duration = 0.0
        self._started = False

    def lasting(self, duration: float) -> None:
        self._duration = duration

    def __call__(self) -> float:
        self._started = not self._started
        return 0.0 if self._started else self._duration


class ScriptedStore(EventStoreDecorator):
    """Answers appends with the commit's events, or raises ``error`` if set."""

    def __init__(self) -> None:
        super().__init__(MemoryEventStore())
        self.error: BaseException | None = None

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        if self.error is not None:
            raise self.error
        return recorded_events(commit, 1)


def commit(events: int) -> Commit:
    new = [NewEvent(f"e{n}", "stream", n + 1, "Happened", b"{}") for n in range(events)]
    return Commit("c", "f", "", "", dt.datetime.now(dt.UTC), {"stream": 0}, new)


async def record(
    metrics: GatewayMetrics, reference: Reference, clock: Clock, calls: int = 1
) -> None:
    """The same observations into ``metrics`` (through the gateway's own hooks) and into
    ``reference``, in the same order."""
    middleware = CommandMetricsMiddleware(metrics)
    scripted = ScriptedStore()
    store = MeteredEventStore(scripted, metrics)
    restock = RestockProduct(product_id="sku-1", quantity=1)
    cancel = CancelOrder(order_id="9b2f4c1e-4f1a-4d6b-9c1e-2f4c1e4f1a4d")

    async def dispatch(command: Command, error: BaseException | None, duration: float) -> None:
        async def handler(_: Command) -> Result:
            if error is not None:
                raise error
            return []

        clock.lasting(duration)
        outcome = "ok" if error is None else getattr(error, "reason", "error")
        if isinstance(error, asyncio.CancelledError):
            outcome = "cancelled"
        try:
            await middleware(command, handler)
        except BaseException as raised:
            assert raised is error
        else:
            assert error is None
        reference.command_duration.labels(type(command).__name__, outcome).observe(duration)

    async def append(events: int, error: BaseException | None, duration: float) -> None:
        scripted.error = error
        clock.lasting(duration)
        try:
            await store.append(commit(events))
        except BaseException as raised:
            assert raised is error
        else:
            assert error is None
        outcome = "error"
        if error is None:
            outcome = "ok"
        elif isinstance(error, ConcurrencyConflictError):
            outcome = "conflict"
        elif isinstance(error, DuplicateCommandError):
            outcome = "duplicate"
        elif isinstance(error, asyncio.CancelledError):
            outcome = "cancelled"
        reference.append_duration.labels(outcome).observe(duration)
        if error is None:
            reference.append_batch.observe(events)

    for call in range(calls):
        for index, duration in enumerate(DURATIONS):
            code = (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED)[
                (index + call) % 3
            ]
            method = f"{ORDERS}/{('CreateOrder', 'CancelOrder')[index % 2]}"
            metrics.rpc_finished(
                RpcOutcome(method, "unary", code, duration, "r", "c", "u", "peer", "")
            )
            reference.rpc(method, code, duration)

            await dispatch(restock, None, duration)
            await dispatch(cancel, InsufficientInventoryError([]), duration)
            await dispatch(restock, ProductNotFoundError("sku-1"), duration)
            await dispatch(cancel, asyncio.CancelledError(), duration)
            await dispatch(restock, RuntimeError("boom"), duration)

            await append(index % 4 + 1, None, duration)
            await append(100 + index, None, duration)
            await append(1, ConcurrencyConflictError("conflict"), duration)
            await append(1, DuplicateCommandError("c"), duration)
            await append(1, OSError("disk"), duration)
            await append(2, asyncio.CancelledError(), duration)

            lag = (0, 1, 7, 100, 100_001)[index % 5]
            metrics.subscription_lag(head_position=lag + 3, delivered_position=3)
            reference.subscription_lags.observe(lag)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    # Both sides' _created series read time.time() as series are created.
    monkeypatch.setattr(time, "time", lambda: CREATED)
    scripted = Clock()
    monkeypatch.setattr(time, "perf_counter", scripted)
    return scripted


# prometheus_client's switch of _created series, and its OpenMetrics exposition, have no
# annotations.
@pytest.fixture(params=["created", "no created"])
def created_series(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.param == "no created":
        disable_created_metrics()  # type: ignore[no-untyped-call]
    yield
    enable_created_metrics()  # type: ignore[no-untyped-call]


@pytest.mark.usefixtures("created_series")
async def test_a_scrape_reads_as_prometheus_clients_own_metrics(clock: Clock) -> None:
    metrics, reference = GatewayMetrics(), Reference()
    # Before any call too: the series without labels are there from the start.
    assert generate_latest(metrics.registry) == generate_latest(reference.registry)

    await record(metrics, reference, clock, calls=3)

    text = generate_latest(metrics.registry).decode()
    assert text == generate_latest(reference.registry).decode()
    openmetrics = generate_openmetrics(metrics.registry)  # type: ignore[no-untyped-call]
    assert openmetrics == generate_openmetrics(reference.registry)  # type: ignore[no-untyped-call]
    assert 'grpc_code="NOT_FOUND"' in text
    assert 'order_gateway_command_seconds_count{command="CancelOrder",outcome="cancelled"}' in text
    assert 'order_gateway_command_seconds_count{command="RestockProduct",outcome="error"}' in text


async def test_a_scrape_of_some_names_reads_as_prometheus_clients_own(clock: Clock) -> None:
    metrics, reference = GatewayMetrics(), Reference()
    await record(metrics, reference, clock)

    def families(registry: CollectorRegistry) -> dict[str, Metric]:
        # ?name[]=... in the URL: the registry's families in no particular order.
        names = {"grpc_server_handled_total", "order_gateway_store_append_events_bucket"}
        text = generate_latest(registry.restricted_registry(names)).decode()
        return {family.name: family for family in text_string_to_metric_families(text)}

    ours = families(metrics.registry)
    assert ours == families(reference.registry)
    assert sorted(ours) == ["grpc_server_handled", "order_gateway_store_append_events"]


def test_a_scrape_while_new_series_are_recorded_sees_whole_series() -> None:
    metrics = GatewayMetrics()

    def call(method: int) -> None:
        code = grpc.StatusCode.OK
        outcome = RpcOutcome(f"{ORDERS}/M{method}", "unary", code, 0.001, "", "", "", "", "")
        metrics.rpc_finished(outcome)

    # Enough series that each scrape's loop over them is interrupted by new ones.
    for method in range(2_000):
        call(method)
    errors: list[BaseException] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            try:
                generate_latest(metrics.registry)
            except BaseException as error:
                errors.append(error)
                return

    scraper = threading.Thread(target=scrape)
    # Threads take turns often, so that scrapes run in the middle of recording.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    scraper.start()
    try:
        for method in range(2_000, 3_000):
            call(method)
    finally:
        stop.set()
        scraper.join()
        sys.setswitchinterval(switch_interval)
    assert errors == []
    labels = {"grpc_service": ORDERS[1:], "grpc_method": "M2999", "grpc_type": "unary"}
    registry = metrics.registry
    assert registry.get_sample_value("grpc_server_handling_seconds_count", labels) == 1
    assert registry.get_sample_value("grpc_server_handled_total", labels | {"grpc_code": "OK"})
