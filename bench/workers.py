"""``serve --workers 2`` against ``--workers 1``, and live delivery across workers.

Both gateways run at once on fresh stores of the same kind, and each load point is
measured on one and then the other, for several rounds, so that both see the same
machine. The load generator spreads its callers over many connections: the kernel
balances ``SO_REUSEPORT`` listeners by connection, not by call. Server CPU per call
counts the supervisor and every worker, and says how much of it was the supervisor's (on
SQLite: the store's one writer and the hub), which one process bounds whatever N is.

Live delivery: subscribers on several connections (so, on both workers: the supervisor's
``/metrics`` says how many each holds) while orders are placed one at a time through
other connections; for each order, the time from sending the command to each
subscriber receiving its ``OrderCreated``. That includes the command itself; the same
time less the command's own latency (the creator's answer) is reported beside it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from orders.v1 import (
    event_stream_service_pb2,
    event_stream_service_pb2_grpc,
    order_command_service_pb2_grpc,
)
from prometheus_client.parser import text_string_to_metric_families

from bench import workload
from bench.loadgen import LoadSpec, run_load
from bench.servers import ServerProcess, cpu_seconds, free_port, restock, start_gateway
from bench.stats import Latencies, LoadResult
from bench.stores import StoreSpec, supported

WORKER_COUNTS = (1, 2)
LOAD_CONCURRENCY = (1, 32)
CHANNELS_PER_PROCESS = 8
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
    from_send: Latencies
    """Command sent → a subscriber received its first event."""
    after_answer: Latencies
    """The same, less the time the creator waited for its own answer (not below 0)."""
    missing: int = 0
    """Deliveries that never arrived (there should be none)."""


def label(store: str, workers: int) -> str:
    return f"{store} x{workers}"


def _progress(result: LoadResult) -> None:
    print(
        f"  {result.server:<14} c={result.concurrency:<3} {result.calls_per_s:8,.0f} calls/s  "
        f"p50 {result.latency.p50_ms:6.2f} ms  server CPU {result.server_cpu_ms_per_call:.3f} "
        f"ms/call",
        file=sys.stderr,
        flush=True,
    )


async def measure(
    spec: StoreSpec,
    workdir: Path,
    duration: float,
    warmup: float,
    processes: int,
    rounds: int,
    load_results: list[LoadResult],
    delivery_results: list[DeliveryResult],
) -> str | None:
    """Measure ``spec``'s store into the two lists (load: ``server`` is "<store> x<N>");
    the reason it could not, or None."""
    with (
        spec.fresh(workdir, f"workers-{spec.kind}-1") as first,
        spec.fresh(workdir, f"workers-{spec.kind}-2") as second,
    ):
        reason = await supported(first)
        if reason is not None:
            return reason
        metrics_port = free_port()
        async with (
            await start_gateway(first, workdir, workers=1) as one,
            await start_gateway(second, workdir, workers=2, metrics_port=metrics_port) as two,
        ):
            servers = {1: one, 2: two}
            for workers, server in servers.items():
                await restock(server.target)
                # Unmeasured: each worker keeps its own aggregate cache, filled by the
                # commands it serves; the figures are for warm caches, as in a long run.
                warm = LoadSpec(
                    server.target,
                    "create",
                    max(LOAD_CONCURRENCY),
                    duration,
                    0.0,
                    processes,
                    CHANNELS_PER_PROCESS,
                )
                await asyncio.to_thread(run_load, warm, label(spec.kind, workers))
            for _ in range(rounds):
                for level in LOAD_CONCURRENCY:
                    for workers in WORKER_COUNTS:
                        server = servers[workers]
                        load = LoadSpec(
                            target=server.target,
                            workload="create",
                            concurrency=level,
                            duration=duration,
                            warmup=warmup,
                            processes=processes,
                            channels=CHANNELS_PER_PROCESS,
                        )
                        result = await asyncio.to_thread(
                            measure_load, load, spec.kind, workers, server
                        )
                        _progress(result)
                        load_results.append(result)
            delivery = await measure_delivery(two, spec.kind, metrics_port)
            print(
                f"  live delivery across workers on {spec.kind}: p99 "
                f"{delivery.from_send.p99_ms:.2f} ms from the command's send, "
                f"{delivery.after_answer.p99_ms:.2f} ms after its answer; subscribers by "
                f"worker {delivery.subscribers_per_worker}",
                file=sys.stderr,
            )
            delivery_results.append(delivery)
    return None


def measure_load(load: LoadSpec, store: str, workers: int, server: ServerProcess) -> LoadResult:
    """One load point; server CPU split into the supervisor's and the workers'."""
    samples: list[tuple[float, float]] = []

    def server_cpu() -> float:
        samples.append((server.cpu_seconds(), cpu_seconds(server.pid)))
        return samples[-1][0]

    result = run_load(load, label(store, workers), server_cpu)
    (tree_before, own_before), (tree_after, own_after) = samples
    if workers == 1 or tree_after <= tree_before:
        return result
    share = (own_after - own_before) / (tree_after - tree_before)
    return dataclasses.replace(
        result, supervisor_cpu_ms_per_call=result.server_cpu_ms_per_call * share
    )


def _subscriptions_by_worker(metrics_port: int) -> dict[str, int]:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        sample.labels["worker"]: int(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "order_gateway_subscriptions" and "worker" in sample.labels
    }


async def measure_delivery(gateway: ServerProcess, store: str, metrics_port: int) -> DeliveryResult:
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(gateway.target, options) for _ in range(2 * SUBSCRIBERS)]
    received: list[dict[str, float]] = [{} for _ in range(SUBSCRIBERS)]
    caught_up = [asyncio.Event() for _ in range(SUBSCRIBERS)]

    async def subscribe(n: int) -> None:
        stub = event_stream_service_pb2_grpc.EventStreamServiceStub(channels[n])
        request = event_stream_service_pb2.SubscribeRequest(
            from_end=True, event_types=["OrderCreated"]
        )
        async for response in stub.Subscribe(request):
            if response.HasField("checkpoint"):
                caught_up[n].set()
            else:
                received[n][response.event.order_created.order_id] = time.perf_counter()

    readers = [asyncio.ensure_future(subscribe(n)) for n in range(SUBSCRIBERS)]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in caught_up)), DELIVERY_TIMEOUT)
        by_worker = await asyncio.to_thread(_subscriptions_by_worker, metrics_port)
        writers = [
            order_command_service_pb2_grpc.OrderCommandServiceStub(c)
            for c in channels[SUBSCRIBERS:]
        ]
        sent: dict[str, tuple[float, float]] = {}
        customer = str(uuid.uuid4())
        rng = random.Random(7)
        for n in range(DELIVERY_ORDERS):
            request = workload.create_request(rng, customer)
            started = time.perf_counter()
            responses = [r async for r in writers[n % len(writers)].CreateOrder(request)]
            answered = time.perf_counter()
            sent[responses[0].event.order_created.order_id] = (started, answered)
            await asyncio.sleep(DELIVERY_PAUSE_SECONDS)
        deadline = time.perf_counter() + DELIVERY_TIMEOUT
        # The readers fill dicts; stragglers (there should be none) get a bounded wait.
        while time.perf_counter() < deadline and any(len(r) < len(sent) for r in received):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for channel in channels:
            await channel.close()
    from_send, after_answer = [], []
    missing = 0
    for order_id, (started, answered) in sent.items():
        for arrivals in received:
            arrived = arrivals.get(order_id)
            if arrived is None:
                missing += 1
                continue
            from_send.append(arrived - started)
            after_answer.append(max(0.0, arrived - answered))
    return DeliveryResult(
        store,
        len(sent),
        by_worker,
        Latencies.of(from_send),
        Latencies.of(after_answer),
        missing,
    )
