"""Subscription benchmarks: catch-up over a large store, and fan-out to live subscribers.

Catch-up: a store of N events (default a million) is built by appending straight through
the store in big commits (no gateway, no commands: only the events matter), then one
client subscribes from position 0 and counts events until it has them all. Its floor is
the bare server streaming the same number of ready-made messages of the same size from
memory, read by the same client.

Fan-out: live subscribers (``from_end``) are opened in client processes, then the same
closed-loop CreateOrder load as the gRPC section runs; each subscriber must receive every
committed event. The gateway's resident memory is sampled throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
from orders.v1 import event_stream_service_pb2, event_stream_service_pb2_grpc

from bench import workload
from bench.loadgen import BARRIER_TIMEOUT, LoadSpec, run_load, split
from bench.report import CatchUpResult, FanOutResult
from bench.servers import ServerProcess, start_gateway
from domain import events as domain_events
from domain.mapper import to_new_event
from domain.ports import NewEvent
from server.stores.factory import open_store

T = TypeVar("T")

COMMIT_EVENTS = 1000
"""Events per commit when building the catch-up store."""
RSS_SAMPLE_SECONDS = 0.2
STREAM_TIMEOUT = 600.0
"""Longest a catch-up (or a fan-out's load) may take before the run gives up on it."""
DRAIN_TIMEOUT = 120.0
"""After the fan-out load, how long subscribers get to receive every committed event."""
_ORDER_PLACEHOLDER = "00000000-0000-4000-8000-000000000000"
MB = 1024 * 1024


def _templates() -> tuple[bytes, bytes]:
    """Stored JSON of an OrderCreated and a StockReserved, with a placeholder order id."""
    price = domain_events.MoneyAmount(currency_code="EUR", units=10)
    product = workload.product_id(0)
    created = domain_events.OrderCreated(
        order_id=_ORDER_PLACEHOLDER,
        customer_id=str(uuid.uuid4()),
        items=(
            domain_events.OrderedItem(
                product_id=product, quantity=1, unit_price=price, line_total=price
            ),
        ),
        shipping_address=domain_events.ShippingAddress(
            recipient="Ada Lovelace", line1="1 Analytical St", city="London", country_code="GB"
        ),
        total=price,
    )
    reserved = domain_events.StockReserved(
        product_id=product,
        order_id=_ORDER_PLACEHOLDER,
        quantity=1,
        available_after=workload.RESTOCK_QUANTITY - 1,
    )
    return (
        to_new_event(created, "", "", 1).data,
        to_new_event(reserved, "", "", 1).data,
    )


async def build_store(url: str, events: int) -> int:
    """Append ``events`` events (order placed, stock reserved, in pairs) in big commits.

    Returns the head position. Every event is a real, decodable domain event; only the
    order id varies, which is all the subscriber's side can notice.
    """
    created_template, reserved_template = _templates()
    placeholder = _ORDER_PLACEHOLDER.encode()
    product_versions: dict[str, int] = {}
    store = await open_store(url)
    try:
        pair = 0
        appended = 0
        while appended < events:
            batch: list[NewEvent] = []
            expected: dict[str, int] = {}
            while len(batch) < COMMIT_EVENTS and appended + len(batch) < events:
                order_id = str(uuid.uuid4())
                order_stream = f"order-{order_id}"
                product_stream = f"product-{workload.product_id(pair % workload.PRODUCT_COUNT)}"
                version = product_versions.get(product_stream, 0)
                expected.setdefault(product_stream, version)
                expected[order_stream] = 0
                batch.append(
                    NewEvent(
                        str(uuid.uuid4()),
                        order_stream,
                        1,
                        "OrderCreated",
                        created_template.replace(placeholder, order_id.encode()),
                    )
                )
                if appended + len(batch) < events:
                    batch.append(
                        NewEvent(
                            str(uuid.uuid4()),
                            product_stream,
                            version + 1,
                            "StockReserved",
                            reserved_template.replace(placeholder, order_id.encode()),
                        )
                    )
                    product_versions[product_stream] = version + 1
                pair += 1
            await store.append(workload.raw_commit(expected, batch))
            appended += len(batch)
        return await store.head_position()
    finally:
        await store.close()


async def _catch_up_client(target: str, expected: int) -> tuple[int, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = event_stream_service_pb2_grpc.EventStreamServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 60)
        started = time.perf_counter()
        call = stub.Subscribe(
            event_stream_service_pb2.SubscribeRequest(after_position=0), timeout=STREAM_TIMEOUT
        )
        received = 0
        async for response in call:
            if response.HasField("event"):
                received += 1
                if received >= expected:
                    break
        elapsed = time.perf_counter() - started
        call.cancel()
    return received, elapsed


def catch_up_client(target: str, expected: int) -> tuple[int, float]:
    """In a client process: subscribe from 0, count ``expected`` events; (count, seconds)."""
    return asyncio.run(_catch_up_client(target, expected))


async def with_rss_samples(rss: Callable[[], int], work: Awaitable[T]) -> tuple[T, float]:
    """Run ``work`` while sampling a server's RSS; the result and the peak RSS in MB."""
    peak = rss()
    task = asyncio.ensure_future(work)
    while not task.done():
        peak = max(peak, rss())
        await asyncio.wait({task}, timeout=RSS_SAMPLE_SECONDS)
    return task.result(), max(peak, rss()) / MB


def client_pool() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))


async def in_client_process(pool: ProcessPoolExecutor, function: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(pool, function, *args)


async def head_position(target: str) -> int:
    """The gateway's committed head, as a ``from_end`` subscription's first checkpoint."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = event_stream_service_pb2_grpc.EventStreamServiceStub(channel)
        call = stub.Subscribe(event_stream_service_pb2.SubscribeRequest(from_end=True), timeout=30)
        async for response in call:
            if response.HasField("checkpoint"):
                call.cancel()
                return int(response.checkpoint.position)
    raise RuntimeError("Subscribe ended without a checkpoint")


async def _live_subscribers(
    target: str,
    count: int,
    ready: multiprocessing.synchronize.Barrier,
    finished: multiprocessing.synchronize.Event,
    expected: Any,
) -> list[int]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = event_stream_service_pb2_grpc.EventStreamServiceStub(channel)
        received = [0] * count
        opened = [asyncio.Event() for _ in range(count)]
        goal = 0  # events each must receive: known once the load has ended
        short = count
        all_received = asyncio.Event()

        def count_one(n: int) -> None:
            nonlocal short
            received[n] += 1
            if received[n] == goal:
                short -= 1
                if not short:
                    all_received.set()

        async def consume(n: int) -> None:
            call = stub.Subscribe(event_stream_service_pb2.SubscribeRequest(from_end=True))
            async for response in call:
                if response.HasField("event"):
                    count_one(n)
                else:
                    opened[n].set()  # the checkpoint on catching up: the stream is live

        consumers = [asyncio.create_task(consume(n)) for n in range(count)]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), BARRIER_TIMEOUT)
            await asyncio.to_thread(ready.wait, BARRIER_TIMEOUT)
            await asyncio.to_thread(finished.wait, STREAM_TIMEOUT)
            goal = expected.value
            short = sum(1 for n in received if n < goal)
            if short:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(all_received.wait(), DRAIN_TIMEOUT)
        finally:
            for consumer in consumers:
                consumer.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)
        return received


def _fan_out_worker(
    target: str,
    count: int,
    ready: multiprocessing.synchronize.Barrier,
    finished: multiprocessing.synchronize.Event,
    expected: Any,
    results: multiprocessing.queues.Queue[tuple[list[int], str]],
) -> None:
    """A client process holding ``count`` live subscriptions until each has received
    ``expected.value`` events after ``finished`` is set; reports the counts."""
    try:
        counts = asyncio.run(_live_subscribers(target, count, ready, finished, expected))
        results.put((counts, ""))
    except Exception as error:
        ready.abort()
        results.put(([], f"{type(error).__name__}: {error}"))


async def measure_catch_up(
    url: str, kind: str, events: int, workdir: Path, pool: ProcessPoolExecutor
) -> CatchUpResult:
    """Build a store of ``events`` events at ``url``, then time one subscriber's catch-up."""
    head = await build_store(url, events)
    async with await start_gateway(url, workdir) as gateway:
        cpu_before = gateway.cpu_seconds()
        (received, seconds), peak = await with_rss_samples(
            gateway.rss_bytes,
            in_client_process(pool, catch_up_client, gateway.target, head),
        )
        cpu = gateway.cpu_seconds() - cpu_before
    return CatchUpResult(kind, received, seconds, cpu / max(received, 1) * 1e6, peak)


async def measure_catch_up_floor(
    floor: ServerProcess, events: int, pool: ProcessPoolExecutor
) -> CatchUpResult:
    cpu_before = floor.cpu_seconds()
    received, seconds = await in_client_process(pool, catch_up_client, floor.target, events)
    cpu = floor.cpu_seconds() - cpu_before
    return CatchUpResult("floor", received, seconds, cpu / max(received, 1) * 1e6)


async def measure_fan_out(
    gateway: ServerProcess, kind: str, subscribers: int, load: LoadSpec
) -> FanOutResult:
    """CreateOrder load alone, then again with ``subscribers`` live subscriptions open."""
    alone = await asyncio.to_thread(run_load, load, kind, gateway.cpu_seconds)
    rss_idle = gateway.rss_bytes() / MB
    head_before = await head_position(gateway.target)
    context = multiprocessing.get_context("spawn")
    shares = split(subscribers, load.processes)
    ready = context.Barrier(len(shares) + 1)
    finished = context.Event()
    expected = context.Value("q", 0)
    results: multiprocessing.queues.Queue[tuple[list[int], str]] = context.Queue()
    workers = [
        context.Process(
            target=_fan_out_worker,
            args=(gateway.target, share, ready, finished, expected, results),
            daemon=True,
        )
        for share in shares
    ]
    for worker in workers:
        worker.start()
    try:
        await asyncio.to_thread(ready.wait, BARRIER_TIMEOUT)
        loaded, peak_loaded = await with_rss_samples(
            gateway.rss_bytes, asyncio.to_thread(run_load, load, kind, gateway.cpu_seconds)
        )
        head_after = await head_position(gateway.target)
        expected.value = head_after - head_before
        finished.set()
        reports, peak_draining = await with_rss_samples(
            gateway.rss_bytes,
            asyncio.gather(
                *(
                    asyncio.to_thread(results.get, True, DRAIN_TIMEOUT + BARRIER_TIMEOUT)
                    for _ in workers
                )
            ),
        )
    finally:
        finished.set()
        for worker in workers:
            await asyncio.to_thread(worker.join, BARRIER_TIMEOUT)
            if worker.is_alive():
                worker.kill()
    failures = [failure for _, failure in reports if failure]
    if failures:
        raise RuntimeError("; ".join(failures))
    counts = [n for share, _ in reports for n in share]
    return FanOutResult(
        store=kind,
        subscribers=len(counts),
        create_calls_per_s=loaded.calls_per_s,
        create_calls_per_s_without=alone.calls_per_s,
        events_committed=head_after - head_before,
        delivered_min=min(counts),
        delivered_max=max(counts),
        rss_idle_mb=rss_idle,
        rss_peak_mb=max(peak_loaded, peak_draining),
    )
