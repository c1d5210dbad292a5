"""``serve --workers 2`` against ``--workers 1``, and live delivery across workers.

Both gateways run at once on fresh stores of the same kind, and each load point is
measured on one and then the other, for several rounds, so that both see the same
machine. The load generator spreads its callers over many connections: the kernel
balances ``SO_REUSEPORT`` listeners by connection, not by call. Server CPU per call
counts the supervisor and every worker, and says how much of it was the supervisor's (on
SQLite: the store's one writer and the hub), which one process bounds whatever N is.

The machine's ceiling: on C cores, with every process of the run on them, calls/s can
be at most C / (server + load generator + database CPU per call). Each load point
reports the load generator's CPU per call (its client processes' own) and, for a
PostgreSQL server on this host, its processes' (read from ``/proc`` below the
postmaster whose ``postmaster.pid`` the data directory holds), so that the report can
say how much of the machine the gateway's calls/s leave unused.

Live delivery: one subscriber on each of several connections (so, on both workers), and
orders placed one at a time through the same connections in turn, so that each delivery
is known to cross workers or not: each connection's worker is read from the
supervisor's ``/metrics`` as its subscription opens. The target is commit to subscriber,
which the client cannot see directly; two figures bracket it on the host's one clock:

- *after the answer*: from the creator receiving its answer (after the commit: the
  answer's own trip is not counted) to the subscriber receiving the event (0 when the
  subscriber was first). This is the figure judged.
- *from handling*: from the event's ``occurred_at`` (stamped when the worker took the
  command, before its append) to the subscriber; the append itself (queueing and fsync)
  is counted too, so this is an upper bound.

The time from the command's send (the command's own latency included) is kept as
context.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
from google.protobuf.timestamp_pb2 import Timestamp
from orders.v1 import (
    event_stream_service_pb2,
    event_stream_service_pb2_grpc,
    order_command_service_pb2_grpc,
)

from bench import workload
from bench.load_generators import LoadRunner, load_runner, metric_samples
from bench.loadgen import LoadSpec, run_load
from bench.servers import (
    ServerProcess,
    cpu_seconds,
    free_port,
    restock,
    start_gateway,
    tree_cpu_seconds,
)
from bench.stats import Latencies, LoadResult
from bench.stores import StoreSpec, supported

WORKER_COUNTS = (1, 2)
LOAD_POINTS = (("create", 1), ("create", 32), ("hot", 32))
"""Workload and concurrency of each point of a round: spread orders, and every order on
one product (which the workers take turns at)."""
CONNECTIONS = 16
"""The load generator's connections, shared by its processes: enough for the kernel to
spread them evenly over two workers (it balances connections, not calls)."""
CLIENT_PROCESSES = 2
"""Two client processes, as in the ``grpc`` section. One process spends less client CPU
per call (0.43-0.53 against 0.47-0.52 ms) but answers both workers' connections on one
event loop: in runs one after the other it did not raise ``--workers 2`` / ``--workers 1``
(SQLite at 32 concurrent: 0.97 x with one process; 1.13 x and 0.97 x with two)."""
SUBSCRIBERS = 8
DELIVERY_ORDERS = 300
DELIVERY_PAUSE_SECONDS = 0.002
"""Between two orders of the delivery run: it measures wake-ups, not a queue."""
DELIVERY_TIMEOUT = 30.0


@dataclass(frozen=True)
class DeliveryResult:
    store: str
    orders: int
    subscribers_per_worker: dict[str, int]
    after_answer: Latencies
    """Across workers: the creator's answer -> a subscriber on another worker received
    the event (not below 0): commit to subscriber, less the answer's own trip."""
    from_handling: Latencies
    """Across workers: the event's ``occurred_at`` -> received; commit to subscriber plus
    the append itself, an upper bound."""
    from_send: Latencies
    """Across workers: the command sent -> received (the command's latency included)."""
    same_worker_after_answer: Latencies
    """As ``after_answer``, for subscribers on the worker that took the command."""
    cross_worker: int
    """Deliveries measured across workers (the others were on the creator's worker)."""
    missing: int = 0
    """Deliveries that never arrived (there should be none)."""


def delivery_summary(delivery: DeliveryResult) -> str:
    return (
        f"p50/p99 {delivery.after_answer.p50_ms:.2f}/{delivery.after_answer.p99_ms:.2f} ms "
        f"after the creator's answer ({delivery.from_handling.p50_ms:.2f}/"
        f"{delivery.from_handling.p99_ms:.2f} ms from handling, "
        f"{delivery.from_send.p50_ms:.2f}/{delivery.from_send.p99_ms:.2f} ms from the send; "
        f"{delivery.cross_worker} deliveries across workers; on the creator's worker "
        f"{delivery.same_worker_after_answer.p50_ms:.2f}/"
        f"{delivery.same_worker_after_answer.p99_ms:.2f} ms after the answer); "
        f"subscribers by worker {delivery.subscribers_per_worker}, {delivery.missing} missing"
    )


def label(store: str, workers: int) -> str:
    return f"{store} x{workers}"


def machine_cpu_ms_per_call(result: LoadResult) -> float:
    """Server, load generator and database CPU per call: what one call costs the host."""
    return (
        result.server_cpu_ms_per_call
        + result.client_cpu_ms_per_call
        + result.database_cpu_ms_per_call
    )


def ceiling(result: LoadResult, cores: int | None = None) -> float:
    """The most calls/s ``cores`` (default: this host's) could make at ``result``'s CPU
    per call, were nothing else running."""
    per_call = machine_cpu_ms_per_call(result)
    return (cores or os.cpu_count() or 1) * 1e3 / per_call if per_call else 0.0


def _progress(result: LoadResult) -> None:
    print(
        f"  {result.server:<14} {result.workload:<6} c={result.concurrency:<3} "
        f"{result.calls_per_s:8,.0f} calls/s  "
        f"p50 {result.latency.p50_ms:6.2f} ms  CPU ms/call: server "
        f"{result.server_cpu_ms_per_call:.3f} (supervisor {result.supervisor_cpu_ms_per_call:.3f})"
        f" client {result.client_cpu_ms_per_call:.3f} db {result.database_cpu_ms_per_call:.3f};"
        f" ceiling {ceiling(result):,.0f} calls/s  load {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
        flush=True,
    )


def database_pid(url: str) -> int | None:
    """The postmaster of the PostgreSQL server at ``url`` if it runs on this host and its
    data directory is readable here; else None (its CPU is then not counted)."""
    if not url.startswith("postgresql://"):
        return None
    try:
        with psycopg.connect(url, autocommit=True) as connection:
            row = connection.execute("SELECT current_setting('data_directory')").fetchone()
        assert row is not None
        pid = int((Path(row[0]) / "postmaster.pid").read_text().split()[0])
        cpu_seconds(pid)
    except (psycopg.Error, OSError, ValueError, IndexError):
        return None
    return pid


async def measure(
    spec: StoreSpec,
    workdir: Path,
    duration: float,
    warmup: float,
    processes: int,
    rounds: int,
    load_results: list[LoadResult],
    delivery_results: list[DeliveryResult],
    load_generator: str = "python",
) -> str | None:
    """Measure ``spec``'s store into the two lists (load: ``server`` is "<store> x<N>"),
    with ``load_generator`` (one of ``bench.load_generators.LOAD_GENERATORS``); the
    reason it could not, or None."""
    with (
        spec.fresh(workdir, f"workers-{spec.kind}-1") as first,
        spec.fresh(workdir, f"workers-{spec.kind}-2") as second,
    ):
        reason = await supported(first)
        if reason is not None:
            return reason
        database = database_pid(first)
        metrics_ports = {workers: free_port() for workers in WORKER_COUNTS}
        async with (
            await start_gateway(first, workdir, workers=1, metrics_port=metrics_ports[1]) as one,
            await start_gateway(second, workdir, workers=2, metrics_port=metrics_ports[2]) as two,
        ):
            servers = {1: one, 2: two}
            runners = {w: load_runner(load_generator, port) for w, port in metrics_ports.items()}
            for workers, server in servers.items():
                await restock(server.target)
                # Unmeasured: each worker keeps its own aggregate cache, filled by the
                # commands it serves; the figures are for warm caches, as in a long run.
                # Each worker serves 1/N of the calls (and the restock went to one), so
                # N workers warm N times as long: with one warm-up for both, a worker
                # had yet to see some 15 % of the products, and the one that took the
                # one caller of the next point read them cold.
                warm = LoadSpec(
                    server.target,
                    "create",
                    max(level for _, level in LOAD_POINTS),
                    duration * workers,
                    0.0,
                    processes,
                    CONNECTIONS // processes,
                )
                await asyncio.to_thread(runners[workers], warm, label(spec.kind, workers), _idle)
            for _ in range(rounds):
                for name, level in LOAD_POINTS:
                    for workers in WORKER_COUNTS:
                        server = servers[workers]
                        load = LoadSpec(
                            target=server.target,
                            workload=name,
                            concurrency=level,
                            duration=duration,
                            warmup=warmup,
                            processes=processes,
                            channels=CONNECTIONS // processes,
                        )
                        result = await asyncio.to_thread(
                            measure_load,
                            load,
                            spec.kind,
                            workers,
                            server,
                            database,
                            runners[workers],
                        )
                        _progress(result)
                        load_results.append(result)
            delivery = await measure_delivery(two, spec.kind, metrics_ports[2])
            print(
                f"  live delivery across workers on {spec.kind}: {delivery_summary(delivery)}",
                file=sys.stderr,
            )
            delivery_results.append(delivery)
    return None


def _idle() -> float:
    """The CPU reading of a warm-up, which is not measured."""
    return 0.0


def measure_load(
    load: LoadSpec,
    store: str,
    workers: int,
    server: ServerProcess,
    database: int | None = None,
    runner: LoadRunner = run_load,
) -> LoadResult:
    """One load point, driven by ``runner``; server CPU split into the supervisor's and
    the workers'; the CPU of the PostgreSQL server whose postmaster is ``database``
    beside it."""
    samples: list[tuple[float, float, float]] = []

    def server_cpu() -> float:
        database_cpu = 0.0
        if database is not None:
            with contextlib.suppress(OSError):
                database_cpu = tree_cpu_seconds(database)
        samples.append((server.cpu_seconds(), cpu_seconds(server.pid), database_cpu))
        return samples[-1][0]

    result = runner(load, label(store, workers), server_cpu)
    (tree_before, own_before, db_before), (tree_after, own_after, db_after) = samples
    if result.server_cpu_ms_per_call and tree_after > tree_before:
        per_second = result.server_cpu_ms_per_call / (tree_after - tree_before)
        result = dataclasses.replace(
            result, database_cpu_ms_per_call=max(0.0, db_after - db_before) * per_second
        )
    if workers == 1 or tree_after <= tree_before:
        return result
    share = (own_after - own_before) / (tree_after - tree_before)
    return dataclasses.replace(
        result, supervisor_cpu_ms_per_call=result.server_cpu_ms_per_call * share
    )


def _subscriptions_by_worker(metrics_port: int) -> dict[str, int]:
    return {
        sample.labels["worker"]: int(sample.value)
        for sample in metric_samples(metrics_port)
        if sample.name == "order_gateway_subscriptions" and "worker" in sample.labels
    }


def _seconds(timestamp: Timestamp) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9


@dataclass
class _Arrivals:
    """What one subscriber received: order id -> (wall-clock arrival, occurred_at)."""

    worker: str = "?"
    seen: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)


async def measure_delivery(gateway: ServerProcess, store: str, metrics_port: int) -> DeliveryResult:
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(gateway.target, options) for _ in range(SUBSCRIBERS)]
    subscribers = [_Arrivals() for _ in range(SUBSCRIBERS)]
    caught_up = [asyncio.Event() for _ in range(SUBSCRIBERS)]

    async def subscribe(n: int) -> None:
        stub = event_stream_service_pb2_grpc.EventStreamServiceStub(channels[n])
        request = event_stream_service_pb2.SubscribeRequest(
            from_end=True, event_types=["OrderCreated"]
        )
        seen = subscribers[n].seen
        async for response in stub.Subscribe(request):
            if response.HasField("checkpoint"):
                caught_up[n].set()
            else:
                event = response.event
                seen[event.order_created.order_id] = (time.time(), _seconds(event.occurred_at))

    readers: list[asyncio.Future[None]] = []
    try:
        # One at a time: the worker whose subscription count grew holds this connection.
        counts = await asyncio.to_thread(_subscriptions_by_worker, metrics_port)
        for n in range(SUBSCRIBERS):
            readers.append(asyncio.ensure_future(subscribe(n)))
            await asyncio.wait_for(caught_up[n].wait(), DELIVERY_TIMEOUT)
            now = await asyncio.to_thread(_subscriptions_by_worker, metrics_port)
            grown = [w for w, count in now.items() if count > counts.get(w, 0)]
            subscribers[n].worker = grown[0] if len(grown) == 1 else "?"
            counts = now
        writers = [order_command_service_pb2_grpc.OrderCommandServiceStub(c) for c in channels]
        sent: dict[str, tuple[int, float, float]] = {}
        customer = str(uuid.uuid4())
        rng = random.Random(7)
        for n in range(DELIVERY_ORDERS):
            request = workload.create_request(rng, customer)
            started = time.time()
            responses = [r async for r in writers[n % len(writers)].CreateOrder(request)]
            answered = time.time()
            sent[responses[0].event.order_created.order_id] = (n % len(writers), started, answered)
            await asyncio.sleep(DELIVERY_PAUSE_SECONDS)
        deadline = time.perf_counter() + DELIVERY_TIMEOUT
        # The readers fill dicts; stragglers (there should be none) get a bounded wait.
        while time.perf_counter() < deadline and any(  # noqa: ASYNC110
            len(s.seen) < len(sent) for s in subscribers
        ):
            await asyncio.sleep(0.05)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for channel in channels:
            await channel.close()
    after_answer, from_handling, from_send, same_worker = [], [], [], []
    missing = 0
    for order_id, (writer, started, answered) in sent.items():
        for subscriber in subscribers:
            arrival = subscriber.seen.get(order_id)
            if arrival is None:
                missing += 1
                continue
            arrived, occurred = arrival
            if subscriber.worker == subscribers[writer].worker != "?":
                same_worker.append(max(0.0, arrived - answered))
                continue
            after_answer.append(max(0.0, arrived - answered))
            from_handling.append(max(0.0, arrived - occurred))
            from_send.append(arrived - started)
    return DeliveryResult(
        store,
        len(sent),
        counts,
        Latencies.of(after_answer),
        Latencies.of(from_handling),
        Latencies.of(from_send),
        Latencies.of(same_worker),
        len(after_answer),
        missing,
    )
