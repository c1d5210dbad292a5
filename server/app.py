"""Builds the gRPC server (``create_server``) and runs it until a signal (``serve``)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from orders.v1 import (
    consumer_group_service_pb2,
    consumer_group_service_pb2_grpc,
    event_stream_service_pb2,
    event_stream_service_pb2_grpc,
    inventory_command_service_pb2,
    inventory_command_service_pb2_grpc,
    order_command_service_pb2,
    order_command_service_pb2_grpc,
)

from domain.bus import Middleware
from domain.ports import EventStore, SharedStreamLocks, SnapshotStore
from domain.snapshots import Snapshots
from domain.unit_of_work import AggregateCache
from server.bootstrap import bootstrap
from server.config import GRPC_INT_MAX, Settings
from server.consumer_groups.engine import GroupTuning
from server.consumer_groups.metrics import GroupMetricsCollector, UnservedGroups
from server.consumer_groups.service import ConsumerGroups
from server.consumer_groups.servicer import ConsumerGroupServicer
from server.consumer_groups.stores import open_group_store, partition_leases
from server.event_loop import running_loop_name
from server.launch import held_signal, stop_signals
from server.observability.access_log import AccessLog
from server.observability.hooks import Tracing
from server.observability.interceptor import ObservabilityInterceptor
from server.observability.logs import quiet_client_noise
from server.observability.metrics import (
    CommandMetricsMiddleware,
    GatewayMetrics,
    MeteredEventStore,
    MetricsServer,
    check_metrics_address,
)
from server.observability.otel import otel_tracing
from server.observability.store_faults import FaultWatchingStreamLocks, StoreFaults, watched
from server.rpc.decoding import RequestDecodingInterceptor
from server.rpc.draining import SHUTTING_DOWN, StopGate
from server.rpc.generic_handlers import ServiceTable
from server.rpc.health import GatewayHealthServicer
from server.rpc.last_resort import LastResortInterceptor
from server.rpc.method_handlers import Interceptors
from server.rpc.reflection_pool import MethodFindingPool
from server.rpc.servicers import CommandRunner, InventoryCommandServicer, OrderCommandServicer
from server.rpc.subscription_hub import HubTuning, SubscriptionHub
from server.rpc.subscriptions import EventStreamServicer
from server.security.auth import Authenticator, AuthInterceptor, TokenFileAuthenticator
from server.security.jwt import JwtAuthenticator
from server.security.open_calls import OpenCallBudget, open_call_limit
from server.security.scopes import check_every_method_scoped
from server.security.tls import add_port, server_credentials
from server.stores.factory import open_store
from server.stores.on_loop import CommitsOnLoop
from server.stores.urls import redacted_url
from server.workers.listen_address import ListenError, check_free, until_nobody_listens

log = logging.getLogger("order_gateway.server")

T = TypeVar("T")

STOP_DEADLINE_SECONDS: Final = 9.0
"""Longest a stop takes before the process exits anyway: within the 10 s an operator is
promised, whatever ``ORDER_GATEWAY_SHUTDOWN_GRACE`` says."""
STOP_MARGIN_SECONDS: Final = 2.0
"""Beyond the grace period, for the process to close its store and exit."""


def stop_deadline(settings: Settings) -> float:
    """Seconds from the start of a stop to the process's end, gracefully or not."""
    return min(settings.shutdown_grace + STOP_MARGIN_SECONDS, STOP_DEADLINE_SECONDS)


def stop_on_signals(signals: Sequence[signal.Signals], stop: asyncio.Event) -> None:
    """Set ``stop`` at the first of ``signals``, and ignore them from then on: the stop is
    under way, bounded by its deadline. Not left to the event loop: closing, it puts back
    the default action, and a second SIGTERM arriving as the process exits killed it
    (status 143 instead of 0)."""
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        stop.set()
        for signum in signals:
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)

    for signum in signals:
        loop.add_signal_handler(signum, stopping)
    if held_signal(signals) is not None:
        # It came while the command started (server.launch): a stop like any other.
        stopping()


async def unless_stopped(starting: Awaitable[T], stop: asyncio.Event) -> T | None:
    """What ``starting`` gives, or None once ``stop`` is set first: a stop asked for while
    the gateway starts (its store may take seconds to open) is not kept waiting for the
    start, which is cancelled (its own clean-up runs)."""
    start = asyncio.ensure_future(starting)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((start, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if start.done():
        return start.result()
    start.cancel()
    await asyncio.gather(start, return_exceptions=True)
    return None


def exit_unless_stopped(seconds: float, last_lines: LastLines | None = None) -> None:
    """Exit the process (status 0: it was asked to stop) if it still runs ``seconds``
    from now, once ``last_lines`` are written. A thread, not the event loop: what bounds
    it is what may hang, a store call in a thread of its own (SQLite waiting up to 30 s
    for another process's write lock) that the loop's end and the interpreter's exit wait
    for."""

    def exit_now() -> None:
        log.error("order-gateway did not stop within %.0f s; exiting now", seconds)
        if last_lines is not None:
            last_lines.write()
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.start()


LAST_LINES_SECONDS: Final = 0.1
"""How long a process that exits at its stop's bound waits for its event loop to write
the access lines of the calls still in flight (``LastLines``)."""


class LastLines:
    """The access lines a process exiting at its stop's bound writes first: a call still
    in flight then (its grace period longer than the bound allows, or a stop held up
    before grpc's shutdown began) is answered by the exit itself, its client's
    connection closed, and it would have no line, nor would lines still pending."""

    def __init__(self) -> None:
        self.gateway: Gateway | None = None
        """The gateway whose calls they are, once it serves."""
        self._loop = asyncio.get_running_loop()

    def write(self) -> None:
        """Called from the exit's thread: the lines are written on the event loop, which
        owns them, if it runs them within ``LAST_LINES_SECONDS`` (a loop held up by a
        callback that blocks, or closed already, writes none)."""
        gateway = self.gateway
        if gateway is None:
            return
        written = threading.Event()

        def write_them() -> None:
            try:
                gateway.write_last_lines()
            finally:
                written.set()

        try:
            self._loop.call_soon_threadsafe(write_them)
        except RuntimeError:
            return  # The loop is closed: its calls have all ended, and been flushed.
        written.wait(LAST_LINES_SECONDS)


SERVICES = (
    order_command_service_pb2.DESCRIPTOR.services_by_name["OrderCommandService"],
    inventory_command_service_pb2.DESCRIPTOR.services_by_name["InventoryCommandService"],
    event_stream_service_pb2.DESCRIPTOR.services_by_name["EventStreamService"],
    consumer_group_service_pb2.DESCRIPTOR.services_by_name["ConsumerGroupService"],
)
"""The gateway's own services: they serve once the store is open."""
SERVICE_NAMES = tuple(service.full_name for service in SERVICES)


@dataclass
class Gateway:
    """A started-or-not gateway: the grpc server, its port, and what must be closed with it."""

    server: grpc.aio.Server
    port: int
    store: EventStore
    health: GatewayHealthServicer
    services: ServiceTable
    hub: SubscriptionHub
    groups: ConsumerGroups
    shutdown_grace: float
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    access_log: AccessLog = field(default_factory=AccessLog)
    metrics_server: MetricsServer | None = None
    tracing: Tracing | None = None
    snapshots: Snapshots | None = None
    unserved_groups: UnservedGroups | None = None
    stop_gate: StopGate = field(default_factory=StopGate)
    observability: ObservabilityInterceptor | None = None
    """What counts the calls whose behaviour runs (a stop cuts the others short)."""
    shared_listen: str | None = None
    """The address this gateway shares with the other workers of ``--workers``, if any."""
    server_started: bool = False
    """Whether ``server`` has started (before the store opened, with ``create_server``'s
    ``start_while_opening``)."""
    _stopped: bool = field(default=False, init=False)

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on once started (None without --metrics-listen)."""
        return None if self.metrics_server is None else self.metrics_server.port

    async def start(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.start()
        await self.hub.start()
        if not self.server_started:
            await self.server.start()
            self.server_started = True
        self.services.open()
        for name in (*SERVICE_NAMES, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        """Graceful stop: NOT_SERVING first, refuse new calls, let in-flight ones finish."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        # Before grpc's shutdown, which would cancel the calls still in its queue.
        await self.stop_gate.close()
        # Subscription and Consume streams never end on their own, and server.stop can
        # hang while streaming calls are open: end them first. Groups first: they store
        # their checkpoints while the store is open, and read through the hub.
        if self.unserved_groups is not None:
            self.unserved_groups.close()
        await self.groups.stop()
        await self.hub.stop()
        # After the gate's quiet moment: their NOT_SERVING has gone out.
        self.health.end_watches()
        stopping = asyncio.ensure_future(self.server.stop(self.shutdown_grace))
        # One turn of the loop: grpc's shutdown begins (its connections told to open no
        # more calls) before the held calls are refused and their clients call again.
        await asyncio.sleep(0)
        if self.shared_listen is not None:
            # Refused now, the held calls' clients would connect to a worker still
            # stopping and call just as its own shutdown begins, which cancels such calls:
            # first every worker stops taking connections (each holds its calls meanwhile).
            await until_nobody_listens(self.shared_listen, self.port, PEERS_STOP_SECONDS)
        self.stop_gate.release()
        await self._past_stalled_calls(stopping)
        if self.observability is not None:
            # grpc has answered every call now, and cancelled the handlers still running.
            # One that carries on would write its line only when it ends, after the flush
            # below or never: psycopg, cancelled in a query to a PostgreSQL that does not
            # answer, first asks the server to cancel it and waits for that, up to 10 s,
            # past the store's close and the process's exit (measured: 1 of 20 calls cut
            # during such a stall had no line). Their lines are written now.
            self.observability.cut_running()
        self.access_log.flush()
        if self.snapshots is not None:
            await self.snapshots.drain()
        await self.store.close()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if self.tracing is not None:
            self.tracing.shutdown()

    def write_last_lines(self) -> None:
        """The process exits now, whatever still runs (``LastLines``): the calls in flight
        are logged CANCELLED, and every line pending is written."""
        if self.observability is not None:
            self.observability.cut_running()
        self.access_log.flush()

    async def _past_stalled_calls(self, stopping: asyncio.Future[None]) -> None:
        """Await grpc's shutdown (``stopping``), cutting it short once no call's behaviour
        has run for ``STALLED_AFTER_SECONDS``: the calls it still waits for then are done
        but for their end, which cannot reach their clients (a subscriber that stopped
        reading: the end of its stream queues behind the events it has not read). Waited
        for, they would hold every stop for the whole grace period."""
        observability = self.observability
        if observability is None:
            await stopping
            return
        loop = asyncio.get_running_loop()
        idle_since: float | None = None
        while not stopping.done():
            await asyncio.wait({stopping}, timeout=STALLED_POLL_SECONDS)
            if observability.running:
                idle_since = None
                continue
            now = loop.time()
            if idle_since is None:
                idle_since = now
            elif now - idle_since >= STALLED_AFTER_SECONDS and not stopping.done():
                await self.server.stop(0)
                break
        await stopping


STALLED_AFTER_SECONDS: Final = 0.5
"""How long a stop waits for calls whose behaviour has ended to end too, before it cuts
them (their clients stopped reading)."""
STALLED_POLL_SECONDS: Final = 0.05


SLOW_OPEN_REPORT_SECONDS: Final = (2.0, 10.0)
"""A store still opening is reported after the first, then after every second, seconds."""


async def reported_while_slow(opening: asyncio.Future[Any], url: str) -> None:
    """Wait for ``opening`` (of the store at ``url``: opened, or migrated and closed),
    logging every while that it is still at it."""
    started = time.monotonic()
    first, every = SLOW_OPEN_REPORT_SECONDS
    while not (await asyncio.wait((opening,), timeout=first))[0]:
        log.info(
            "order-gateway still opening store %s after %.0f s (the database has not"
            " answered, or another process holds its schema migration or write lock)",
            redacted_url(url),
            time.monotonic() - started,
        )
        first = every


async def reporting_a_slow_open(opening: Awaitable[EventStore], url: str) -> EventStore:
    """The store ``opening`` gives, logged while it is slow to: opening can wait on a
    database that does not answer, or on another process (a replica's schema migration,
    SQLite's write lock), and a start that says nothing meanwhile looks hung."""
    store = asyncio.ensure_future(opening)
    try:
        await reported_while_slow(store, url)
        return store.result()
    except BaseException:
        # A stop while it opens: the open is cancelled, and a store that opened all the
        # same (at that very moment, or ignoring the cancellation) is closed.
        store.cancel()
        await asyncio.gather(store, return_exceptions=True)
        if not store.cancelled() and store.exception() is None:
            await store.result().close()
        raise


FAILED_START_GRACE_SECONDS: Final = 1.0
"""How long a start that fails after the server started waits for the calls it refused
to be answered before grpc cancels what remains."""

PEERS_STOP_SECONDS = 1.0
"""How long a stopping worker holds its calls for the other workers to stop listening
(they wait up to 0.5 s for quiet before they do)."""


def authenticators_from(settings: Settings) -> list[Authenticator]:
    """Static tokens first (a cheap lookup), then JWTs; none means authentication is off."""
    found: list[Authenticator] = []
    if settings.auth_tokens is not None:
        found.append(TokenFileAuthenticator.from_file(settings.auth_tokens))
    if settings.jwt_public_key is not None:
        found.append(
            JwtAuthenticator.from_file(
                settings.jwt_public_key, settings.jwt_issuer, settings.jwt_audience
            )
        )
    return found


def server_options(settings: Settings, reuse_port: bool = False) -> Sequence[tuple[str, int]]:
    """``reuse_port``: share the address with the other workers of this gateway
    (``server.workers``, which refuses an address a stranger holds before any starts)."""
    return (
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # Accept client keepalive pings down to every 10 s, even without calls in flight.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # grpc sets SO_REUSEPORT by default (grpc/grpc#16920), so a second gateway started
        # on the same address would bind too and the kernel would hand it part of the
        # calls, unnoticed. An address in use is refused instead, as operators expect.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # Calls that arrived but that the event loop has not taken up yet (it takes them one
        # at a time) wait in grpc's queue; past grpc's default of 1,000 it cancels some
        # (all past 3,000) before they reach the gateway, and a client sees CANCELLED,
        # which it does not retry. A burst of 2,000 calls over 50 connections lost 27 to
        # 207 of them that way. With room for bursts, each is taken up and answered: OK,
        # or RESOURCE_EXHAUSTED past max_concurrent_streams.
        ("grpc.server.max_pending_requests", waiting_call_limit(settings.max_concurrent_streams)),
        (
            "grpc.server.max_pending_requests_hard_limit",
            waiting_call_limit(settings.max_concurrent_streams),
        ),
    )


WAITING_CALLS_PER_CONCURRENT_CALL: Final = 10
"""Calls that may wait for the event loop to take them up, per call it may serve at once."""


def waiting_call_limit(max_concurrent_streams: int) -> int:
    """Calls grpc keeps waiting for the event loop before it cancels new ones: ten per
    call served at once, and at least 10,000. A burst of 10,000 CreateOrder calls raised
    the process's peak memory by some 160 MB: the bound keeps a flood of calls from
    holding unbounded memory."""
    return min(
        GRPC_INT_MAX, max(10_000, WAITING_CALLS_PER_CONCURRENT_CALL * max_concurrent_streams)
    )


async def create_server(
    settings: Settings,
    store: EventStore | None = None,
    authenticators: Sequence[Authenticator] | None = None,
    hub_tuning: HubTuning | None = None,
    tracing: Tracing | None = None,
    group_tuning: GroupTuning | None = None,
    reuse_port: bool = False,
    cache: AggregateCache | None = None,
    start_while_opening: bool = False,
) -> Gateway:
    """A configured, bound, not yet started gateway (``--listen`` may use port 0).

    ``authenticators`` default to those the settings name (none: authentication off);
    ``tracing`` to OpenTelemetry with ``--otel``, else none; ``reuse_port`` as in
    ``server_options``. With ``start_while_opening``, the grpc server starts before the
    store opens: health answers NOT_SERVING meanwhile, and calls to the gateway's services
    wait for ``Gateway.start`` (``ServiceTable``), instead of connections waiting unanswered.
    """
    # A method without a scope would be refused on every call: refuse to start instead.
    check_every_method_scoped()
    quiet_client_noise()
    # Key, token and certificate files are read first: a bad one fails before the store opens.
    if authenticators is None:
        authenticators = authenticators_from(settings)
    credentials = server_credentials(settings)
    # Tracing of its own, created here: a start refused from here on shuts it down.
    own_tracing = otel_tracing() if tracing is None and settings.otel else None
    tracing = tracing or own_tracing
    try:
        if not reuse_port:
            # grpc binds what it can of an address and serves there: "localhost" with a
            # stranger on 127.0.0.1 would serve on ::1 alone, and clients that resolve to
            # 127.0.0.1 would reach the stranger.
            try:
                check_free(settings.listen)
            except OSError as error:
                # An address taken, of no interface here, a privileged port, a host that
                # does not resolve: grpc would refuse it too, but after a log line of its
                # own and with only a hint to turn its debug output on. The reason, as
                # with --workers; not os.strerror(errno): a resolver's errno is its own.
                reason = error.reason if isinstance(error, ListenError) else error.strerror
                reason = reason or str(error)
                raise RuntimeError(
                    f"Failed to bind to address {settings.listen}: {reason}"
                ) from error
        metrics = GatewayMetrics()
        metrics_server = (
            MetricsServer(metrics.registry, settings.metrics_listen)
            if settings.metrics_listen
            else None
        )
        access_log = AccessLog()
        stop_gate = StopGate()
        observability = ObservabilityInterceptor([metrics, access_log], tracing)
        server = grpc.aio.server(
            # Observability wraps all the others, so that calls the auth interceptor refuses
            # are still timed, counted and logged, and it sees the status the last-resort
            # handler chose for an escaping error. Of those that act on a call, the stop
            # gate runs first (a stopping gateway refuses whoever calls), then the open
            # services' share of the concurrent calls and authentication, both as each call
            # arrives: their verdict precedes any look at the request.
            interceptors=[
                Interceptors(
                    [
                        observability,
                        LastResortInterceptor(),
                        stop_gate,
                        OpenCallBudget(open_call_limit(settings.max_concurrent_streams)),
                        AuthInterceptor(authenticators),
                        RequestDecodingInterceptor(),
                    ]
                )
            ],
            options=server_options(settings, reuse_port),
            # grpc.max_concurrent_streams only bounds one connection; this bounds the process
            # (more is RESOURCE_EXHAUSTED).
            maximum_concurrent_rpcs=settings.max_concurrent_streams,
        )
        # Both addresses are settled before the store opens: opening a SQLite store creates
        # its file, which a refused start must not leave behind. grpc binds here and refuses
        # what check_free cannot judge; the metrics address is checked against that bound
        # port, which it may name too. The servicers are added to the table once the store is open.
        port = add_port(server, settings.listen, credentials)
        # The one generic handler: health and reflection are served as soon as the server
        # starts, the gateway's services once the store is open (see ServiceTable).
        services = ServiceTable(SERVICES)
        server.add_generic_rpc_handlers((services,))
        health = GatewayHealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, services.as_server())
        for name in (*SERVICE_NAMES, ""):
            await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # What enable_server_reflection would add to an aio server, added to the table
        # (which that function, checking for an aio server, would take for a sync one).
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(
                (
                    *SERVICE_NAMES,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ),
                pool=MethodFindingPool(),
            ),
            services.as_server(),
        )
        server_started = False
        opened: EventStore | None = None
        try:
            if settings.metrics_listen:
                host = settings.listen.rpartition(":")[0]
                check_metrics_address(settings.metrics_listen, f"{host}:{port}")
            if start_while_opening:
                await server.start()
                server_started = True
                # Scraped meanwhile too: a scrape finds the process up, not a refused port.
                # Its address is logged now: the port chosen for port 0 is needed by
                # whoever scrapes, however long the store takes to open.
                if metrics_server is not None and settings.metrics_listen:
                    metrics_host = settings.metrics_listen.rpartition(":")[0]
                    metrics_port = metrics_server.start()
                    log.info("metrics at http://%s:%d/metrics", metrics_host, metrics_port)
                log.debug(
                    "order-gateway starting on %s:%d: opening store %s (health NOT_SERVING"
                    " until it is open)",
                    settings.listen.rpartition(":")[0],
                    port,
                    redacted_url(settings.store),
                )
            if store is None:
                store = opened = await reporting_a_slow_open(
                    open_store(settings.store, pool_size=settings.store_pool_size),
                    settings.store,
                )
            gateway = await _assemble(
                server,
                port,
                settings,
                store,
                services=services,
                health=health,
                metrics=metrics,
                metrics_server=metrics_server,
                access_log=access_log,
                stop_gate=stop_gate,
                tracing=tracing,
                hub_tuning=hub_tuning,
                group_tuning=group_tuning,
                cache=cache,
            )
            if reuse_port:
                gateway.shared_listen = settings.listen
            gateway.server_started = server_started
            gateway.observability = observability
            return gateway
        except BaseException:
            # grpc closes a bound port only when a started server stops: started and stopped
            # at once, any call that came in between cancelled. Calls held while the store
            # opened are refused first, and watches of NOT_SERVING ended.
            services.refuse_held(SHUTTING_DOWN)
            health.end_watches()
            if server_started:
                await server.stop(FAILED_START_GRACE_SECONDS)
            else:
                await server.start()
                await server.stop(None)
            if opened is not None:
                await opened.close()
            if metrics_server is not None:
                await metrics_server.stop()
            raise
    except BaseException:
        if own_tracing is not None:
            own_tracing.shutdown()
        raise


async def _assemble(
    server: grpc.aio.Server,
    port: int,
    settings: Settings,
    store: EventStore,
    *,
    services: ServiceTable,
    health: GatewayHealthServicer,
    metrics: GatewayMetrics,
    metrics_server: MetricsServer | None,
    access_log: AccessLog,
    stop_gate: StopGate,
    tracing: Tracing | None,
    hub_tuning: HubTuning | None,
    group_tuning: GroupTuning | None,
    cache: AggregateCache | None,
) -> Gateway:
    """The gateway of ``create_server``: its services on ``server``, over ``store``."""
    # Every path to the store is watched, so that a fault is logged once, whoever meets it.
    faults = StoreFaults(metrics.store_errors, metrics.store_fault)
    watched_store = watched(store, faults)
    # Only the command path gets the instrumented store: its appends are what is measured.
    command_store: EventStore = MeteredEventStore(watched_store, metrics)
    middleware: list[Middleware] = [CommandMetricsMiddleware(metrics)]
    if tracing is not None:
        command_store = tracing.instrument_store(command_store)
        middleware.append(tracing.command_middleware())
    # Snapshots go to the store itself: their writes are not command appends to measure.
    snapshots = Snapshots(
        store if isinstance(store, SnapshotStore) else None, settings.snapshot_interval
    )
    runner = CommandRunner(
        bootstrap(
            command_store,
            settings.aggregate_cache,
            middleware=middleware,
            shared_locks=(
                FaultWatchingStreamLocks(store, faults)
                if isinstance(store, SharedStreamLocks)
                else None
            ),
            snapshots=snapshots,
            cache=cache,
        )
    )
    if isinstance(store, CommitsOnLoop):
        store.commit_on_loop_when(runner.in_flight.alone)
    stop_gate.quiet_only_when(runner.in_flight.none)
    table = services.as_server()
    order_command_service_pb2_grpc.add_OrderCommandServiceServicer_to_server(
        OrderCommandServicer(runner), table
    )
    inventory_command_service_pb2_grpc.add_InventoryCommandServiceServicer_to_server(
        InventoryCommandServicer(runner), table
    )
    hub = SubscriptionHub(
        watched_store,
        settings.max_subscribers,
        hub_tuning,
        on_lag=lambda head, delivered: metrics.subscription_lag(head, delivered),
    )
    metrics.count_subscriptions(lambda: hub.limited_count)
    event_stream_service_pb2_grpc.add_EventStreamServiceServicer_to_server(
        EventStreamServicer(hub), table
    )
    group_store = await open_group_store(store)
    groups = ConsumerGroups(
        group_store, store, hub, group_tuning, leases=partition_leases(group_store)
    )
    unserved_groups = UnservedGroups(groups, asyncio.get_running_loop())
    metrics.registry.register(GroupMetricsCollector(groups, hub, unserved_groups))
    consumer_group_service_pb2_grpc.add_ConsumerGroupServiceServicer_to_server(
        ConsumerGroupServicer(groups), table
    )
    return Gateway(
        server,
        port,
        store,
        health,
        services,
        hub,
        groups,
        settings.shutdown_grace,
        metrics=metrics,
        unserved_groups=unserved_groups,
        access_log=access_log,
        metrics_server=metrics_server,
        tracing=tracing,
        snapshots=snapshots,
        stop_gate=stop_gate,
    )


def tune_garbage_collection() -> None:
    """Make the cyclic garbage collector rare and cheap for a long-running server.

    Every call allocates thousands of short-lived containers (protobuf messages, pydantic
    models, dicts) that reference counting frees at once, yet each counts towards a
    generation-0 collection every 700 allocations, and every hundredth of those becomes a
    full pass over the module graph and the aggregate cache: pauses of tens of ms. With a
    high threshold and the startup objects frozen out of every pass, p99 of CreateOrder on
    SQLite at 16 concurrent calls went from 51 to 18 ms (``python -m bench``), throughput up 8 %.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def serve(
    settings: Settings,
    *,
    store: EventStore | None = None,
    cache: AggregateCache | None = None,
    reuse_port: bool = False,
    on_serving: Callable[[Gateway], None] | None = None,
    stop: asyncio.Event | None = None,
    signals: Sequence[signal.Signals] | None = None,
    bounded: bool = True,
    internal_metrics: bool = False,
) -> None:
    """Run until one of ``signals`` arrives (or ``stop`` is set), then stop gracefully.

    ``signals`` default to SIGTERM, SIGINT and SIGHUP (``server.launch.stop_signals``).
    A worker of ``--workers N`` passes its ``store`` and aggregate ``cache``,
    ``reuse_port``, ``on_serving`` (told once the gateway serves), a ``stop`` it sets
    itself when its supervisor is gone, and SIGTERM alone: its supervisor handles the
    others;
    ``bounded=False``, since it bounds its stop itself; and ``internal_metrics``: its
    /metrics is read by its supervisor alone, so its address is no operator's concern.
    Otherwise a stop that lasts ``stop_deadline`` ends with the process's exit, whatever
    it still waits for.
    """
    stop = stop if stop is not None else asyncio.Event()
    # From the start: a stop asked for while the store opens is one too.
    stop_on_signals(stop_signals() if signals is None else signals, stop)
    last_lines = LastLines()
    bound = (
        asyncio.ensure_future(_bound_stop(stop, stop_deadline(settings), last_lines))
        if bounded
        else None
    )

    def serving(gateway: Gateway) -> None:
        last_lines.gateway = gateway
        if on_serving is not None:
            on_serving(gateway)

    try:
        await _serve_until(stop, settings, store, cache, reuse_port, serving, internal_metrics)
    finally:
        if bound is not None:
            bound.cancel()


async def _bound_stop(stop: asyncio.Event, seconds: float, last_lines: LastLines) -> None:
    await stop.wait()
    exit_unless_stopped(seconds, last_lines)


async def _serve_until(
    stop: asyncio.Event,
    settings: Settings,
    store: EventStore | None,
    cache: AggregateCache | None,
    reuse_port: bool,
    on_serving: Callable[[Gateway], None] | None,
    internal_metrics: bool,
) -> None:
    # A worker of --workers (its store already open) starts once ready: started sooner,
    # it would answer NOT_SERVING for an address the other workers serve.
    start_while_opening = not reuse_port
    gateway = await unless_stopped(
        create_server(
            settings,
            store=store,
            reuse_port=reuse_port,
            cache=cache,
            start_while_opening=start_while_opening,
        ),
        stop,
    )
    if gateway is None:
        if store is not None:
            # Handed to serve, which closes it as the gateway's stop would have.
            await store.close()
        log.info("stopped before serving")
        return
    await gateway.start()
    tune_garbage_collection()
    # The bound port, not the configured one: with port 0 the OS chose it.
    host = settings.listen.rpartition(":")[0]
    log.info(
        "order-gateway listening on %s:%d (store %s, event loop %s)",
        host,
        gateway.port,
        redacted_url(settings.store),
        running_loop_name(),
    )
    # Started while the store opened, /metrics was logged then (create_server).
    if settings.metrics_listen and gateway.metrics_port is not None and not start_while_opening:
        metrics_host = settings.metrics_listen.rpartition(":")[0]
        if internal_metrics:
            # The supervisor logs the one address to scrape; this one is not it.
            log.debug(
                "metrics for the supervisor at http://%s:%d/metrics",
                metrics_host,
                gateway.metrics_port,
            )
        else:
            log.info("metrics at http://%s:%d/metrics", metrics_host, gateway.metrics_port)
    if on_serving is not None:
        on_serving(gateway)
    await stop.wait()
    log.info("shutting down")
    await gateway.stop()
