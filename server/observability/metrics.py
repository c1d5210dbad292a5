"""Prometheus metrics: RPCs, command dispatch, store appends and faults, subscriptions.

Each gateway has a registry of its own (not prometheus_client's global one), so several
gateways in one process (tests) keep separate counts. Metrics are always collected;
``--metrics-listen`` only decides whether they are served over HTTP at ``/metrics``. The
ones recorded on every call are lock-free (``server.observability.lock_free``) and must be
recorded on the event loop's thread; the rest are prometheus_client's own.

RPC metrics use the names and labels of go-grpc-prometheus (``grpc_server_handled_total``,
``grpc_server_handling_seconds``) so that existing gRPC dashboards and alerts work.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from domain.bus import Next, Result
from domain.commands import Command
from domain.errors import ConcurrencyConflictError, DomainError, DuplicateCommandError
from domain.ports import Commit, EventStore, RecordedEvent
from server.config import split_host_port
from server.observability.hooks import RpcOutcome
from server.observability.lock_free import (
    CounterSeries,
    HistogramSeries,
    LockFreeCounter,
    LockFreeHistogram,
)
from server.stores.decorator import EventStoreDecorator
from server.workers.listen_address import shares_address

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 11, 16, 32, 64, 101, 256)
"""Events per commit: a CreateOrder of n items commits n + 1 events (at most 101)."""
LAG_BUCKETS = (0, 1, 2, 5, 10, 50, 100, 500, 1000, 5000, 10_000, 100_000)


class GatewayMetrics:
    """Every metric of one gateway, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        rpc_labels = ("grpc_service", "grpc_method", "grpc_type")
        self.rpc_handled = LockFreeCounter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            (*rpc_labels, "grpc_code"),
            registry=self.registry,
        )
        self.rpc_duration = LockFreeHistogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC's handler to its end (whole stream for streams).",
            rpc_labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.command_duration = LockFreeHistogram(
            "order_gateway_command_seconds",
            "Command dispatch time through the bus (idempotent replays and retries included), "
            "by command type and outcome (ok, the domain error's reason, cancelled, or error).",
            ("command", "outcome"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.append_duration = LockFreeHistogram(
            "order_gateway_store_append_seconds",
            "Time to append one command's events durably "
            "(outcome ok, conflict, duplicate, cancelled, error).",
            ("outcome",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.append_batch = LockFreeHistogram(
            "order_gateway_store_append_events",
            "Events per committed append (one command's commit).",
            (),
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        ).labels()
        # Recorded on failures only, and from StoreFaults: prometheus_client's own.
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
        self._rpcs: dict[str, _RpcSeries] = {}
        self.subscriptions = Gauge(
            "order_gateway_subscriptions",
            "Subscribe streams open now.",
            registry=self.registry,
        )
        self.subscription_lags = LockFreeHistogram(
            "order_gateway_subscription_lag_events",
            "Committed head position minus the position a subscription (or a consumer "
            "group's reader) has delivered, observed each time it has sent a batch of "
            "events or a checkpoint.",
            (),
            buckets=LAG_BUCKETS,
            registry=self.registry,
        ).labels()

    def rpc_finished(self, outcome: RpcOutcome) -> None:
        """The RPC observer hook (``server.observability.interceptor``)."""
        rpc = self._rpcs.get(outcome.method)
        if rpc is None:
            labels = (outcome.service, outcome.method_name, outcome.rpc_type)
            rpc = self._rpcs[outcome.method] = _RpcSeries(labels, self.rpc_duration.labels(*labels))
        # By the code's name: hashing the enum member (or reading ``.name``) runs Python
        # code each time, some 850 instructions more per call under callgrind.
        code = outcome.code._name_
        handled = rpc.handled.get(code)
        if handled is None:
            handled = rpc.handled[code] = self.rpc_handled.labels(*rpc.labels, code)
        handled.inc()
        rpc.duration.observe(outcome.duration)

    def count_subscriptions(self, count: Callable[[], int]) -> None:
        """Report ``count()`` (the hub's ``limited_count``) as open Subscribe streams.

        Read at scrape time from the HTTP server's thread: ``count`` must be thread-safe
        (``len()`` of a set is).
        """
        self.subscriptions.set_function(count)

    def subscription_lag(self, head_position: int, delivered_position: int) -> None:
        """Record one subscription's lag: the head it knows minus what it has delivered.

        For the subscription hub to call on the event loop each time a subscription has
        sent a batch of events or a checkpoint (per batch, not per event, to stay cheap).
        """
        self.subscription_lags.observe(max(0, head_position - delivered_position))


@dataclass(slots=True)
class _RpcSeries:
    """One method's series, kept so that an RPC's metrics cost two dict lookups."""

    labels: tuple[str, str, str]
    duration: HistogramSeries
    handled: dict[str, CounterSeries] = field(default_factory=dict)
    """By the status code's name."""


class CommandMetricsMiddleware:
    """Times each command's dispatch through the bus, by type and outcome."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._duration = metrics.command_duration
        # Series kept by command type and outcome: a lookup by class hashes no string.
        self._ok: dict[type[Command], HistogramSeries] = {}
        self._failed: dict[tuple[type[Command], str], HistogramSeries] = {}

    async def __call__(self, command: Command, call_next: Next) -> Result:
        started = time.perf_counter()
        try:
            result = await call_next(command)
        except DomainError as error:
            self._observe_failure(type(command), error.reason, started)
            raise
        except asyncio.CancelledError:
            # The caller went away or its deadline passed: no fault of the gateway's, and
            # the command may still have committed.
            self._observe_failure(type(command), "cancelled", started)
            raise
        except BaseException:
            self._observe_failure(type(command), "error", started)
            raise
        ok = self._ok.get(type(command))
        if ok is None:
            ok = self._ok[type(command)] = self._duration.labels(type(command).__name__, "ok")
        ok.observe(time.perf_counter() - started)
        return result

    def _observe_failure(self, kind: type[Command], outcome: str, started: float) -> None:
        series = self._failed.get((kind, outcome))
        if series is None:
            series = self._failed[kind, outcome] = self._duration.labels(kind.__name__, outcome)
        series.observe(time.perf_counter() - started)


class MeteredEventStore(EventStoreDecorator):
    """An ``EventStore`` that times appends and counts events per commit."""

    def __init__(self, inner: EventStore, metrics: GatewayMetrics) -> None:
        super().__init__(inner)
        self._duration = metrics.append_duration
        self._durations: dict[str, HistogramSeries] = {}
        self._batch = metrics.append_batch

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        started = time.perf_counter()
        try:
            recorded = await self._inner.append(commit)
        except ConcurrencyConflictError:
            self._observe("conflict", started)
            raise
        except DuplicateCommandError:
            self._observe("duplicate", started)
            raise
        except asyncio.CancelledError:
            # Its caller stopped waiting; the append may commit all the same, so it is
            # neither an error nor counted among the committed ones.
            self._observe("cancelled", started)
            raise
        except BaseException:
            self._observe("error", started)
            raise
        self._observe("ok", started)
        self._batch.observe(len(recorded))
        return recorded

    def _observe(self, outcome: str, started: float) -> None:
        duration = self._durations.get(outcome)
        if duration is None:
            duration = self._durations[outcome] = self._duration.labels(outcome)
        duration.observe(time.perf_counter() - started)


def _cannot_serve(host: str, port: int, error: OSError) -> OSError:
    # The bare OSError names no address; the gateway listens on two.
    return OSError(error.errno, f"cannot serve metrics on {host}:{port}: {error.strerror}")


def check_metrics_address(listen: str, grpc_listen: str) -> None:
    """Refuse ``listen`` now if ``MetricsServer.start`` could not bind it there, with the
    error ``start`` would raise: ``serve`` checks its addresses before it opens the store,
    which on SQLite creates the file, so that a refused start leaves nothing behind.

    Binds as prometheus_client does: the first address the host resolves to, with
    ``SO_REUSEADDR`` (so an earlier server's connections in TIME_WAIT do not count). An
    address that ``grpc_listen`` (with its port bound) also takes is refused first: that
    bind could succeed on another of its addresses (``localhost`` beside ``[::1]``), or
    beside the workers' reservation, which does not listen.
    """
    host, port = split_host_port(listen)
    if shares_address(grpc_listen, listen):
        raise _cannot_serve(host, port, OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)))
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:
        raise _cannot_serve(host, port, error) from error


class MetricsServer:
    """Serves one registry at ``/metrics`` from prometheus_client's HTTP server thread."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        self._registry = registry
        self._host, self._port = split_host_port(listen)
        self._httpd: WSGIServer | None = None

    @property
    def port(self) -> int | None:
        """The bound port while serving (useful with port 0)."""
        return None if self._httpd is None else int(self._httpd.server_port)

    def start(self) -> int:
        """Start serving, unless started; returns the bound port."""
        if self._httpd is not None:
            return int(self._httpd.server_port)
        try:
            httpd, _thread = start_http_server(self._port, self._host, self._registry)
        except OSError as error:
            raise _cannot_serve(self._host, self._port, error) from error
        self._httpd = httpd
        return int(httpd.server_port)

    async def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        # shutdown() waits for the serving loop's next poll (up to 0.5 s): not on the loop.
        await asyncio.to_thread(httpd.shutdown)
        httpd.server_close()
