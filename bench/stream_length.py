"""CreateOrder latency against a product whose stream holds 10 events and 100,000.

A hot product gets a StockReserved on every order, so its stream grows without bound.
The unit of work keeps loaded aggregates in a cache and reads only the events after the
cached version, through the (stream_id, stream_version) index: latency should not move
with the stream's length. The same runs with the cache off (capacity 0) replay the whole
stream on every command, which is the cost the cache removes.

In process (``bootstrap(store)`` and ``bus.dispatch``, no gRPC), on SQLite in a temporary
directory, one order at a time so that each latency is one command's own path, taking
turns between the short and the long stream.

    python -m bench.stream_length [--orders 300] [--uncached-orders 10] [--long 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.inprocess import gateway_gc_settings
from bench.stats import Latencies
from bench.workload import order_input
from domain.aggregates import Product
from domain.bus import CommandBus
from domain.commands import CreateOrder, RestockProduct
from domain.events import ProductRestocked, StockReleased, StockReserved
from domain.mapper import to_domain_event, to_new_event
from domain.ports import Commit, EventPayload, EventStore, Snapshot, SnapshotStore
from domain.snapshots import Snapshots, sealed
from server.bootstrap import bootstrap
from server.stores.factory import open_store
from server.stores.sqlite import SQLiteEventStore

PRODUCT = "hot"
STREAM = f"product-{PRODUCT}"
CHUNK = 2_000
"""Events per commit while building the long stream: a few large transactions, not 100,000."""
ELSEWHERE = "elsewhere"
"""A product with a short stream, for the first command after a restart."""
SHORT = 10
RESTOCK = 1_000
"""Units per restock: even the short stream holds more stock than a run orders."""


@dataclass(frozen=True)
class Run:
    stream_length: int
    cached: bool
    first_ms: float
    """The first order, which loads the product from the store (a cold cache)."""
    latency: Latencies


async def build_stream(store: EventStore, length: int) -> None:
    """``length`` restocks on the product's stream, straight into the store."""
    version = 0
    while version < length:
        size = min(CHUNK, length - version)
        events = [
            to_new_event(
                ProductRestocked(
                    product_id=PRODUCT, quantity=RESTOCK, available_after=RESTOCK * (version + n)
                ),
                str(uuid.uuid4()),
                STREAM,
                version + n,
            )
            for n in range(1, size + 1)
        ]
        await store.append(
            Commit(
                command_id=str(uuid.uuid4()),
                fingerprint="bench-build",
                correlation_id="",
                user_id="",
                occurred_at=dt.datetime.now(dt.UTC),
                expected_versions={STREAM: version},
                events=events,
            )
        )
        version += size


@dataclass(frozen=True)
class ColdStart:
    stream_length: int
    snapshot_interval: int
    """0: snapshots off, the whole stream is replayed."""
    cold_ms: float
    """Median over the restarts of the first order on the long product after each."""
    warm_p50_ms: float
    """p50 of the orders that follow it on the same product (cached), over all restarts."""
    cold_cpu_ms: float
    warm_cpu_ms: float
    """The process's CPU time (all its threads) over the same orders, medians: the work
    a cold start adds, which a loaded machine disturbs less than it does latency."""

    taking_mean_ms: float = 0.0
    """Mean latency of warm orders on the product while snapshots are taken every interval
    (at 0, none are: the baseline). The mean, for an append that meets a snapshot's write
    waits on SQLite's write lock, which the median never shows."""
    snapshot_write_ms: float = 0.0
    """Median time of one background snapshot write (0: none written)."""

    @property
    def ratio(self) -> float:
        return self.cold_ms / self.warm_p50_ms if self.warm_p50_ms else 0.0


class _LoadOnly:
    """Snapshots as stored, none written: every restart finds the snapshot this
    measurement left, not one the orders it measures would have added."""

    def __init__(self, store: SnapshotStore) -> None:
        self._store = store

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        return await self._store.load_snapshot(stream_id)

    async def load_snapshot_and_events(
        self, stream_id: str
    ) -> tuple[Snapshot | None, list[EventPayload]]:
        return await self._store.load_snapshot_and_events(stream_id)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        return None


class _TimedWrites(_LoadOnly):
    """A store's snapshots, each write made and timed."""

    def __init__(self, store: SnapshotStore) -> None:
        super().__init__(store)
        self.writes_ms: list[float] = []

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        started = time.perf_counter()
        await self._store.save_snapshot(snapshot)
        self.writes_ms.append((time.perf_counter() - started) * 1e3)


def _snapshots_of(store: EventStore) -> SnapshotStore:
    if not isinstance(store, SnapshotStore):
        raise SystemExit(f"{type(store).__name__} keeps no snapshots")
    return store


async def save_worst_snapshot(store: EventStore, length: int, interval: int) -> None:
    """The snapshot the background could have left furthest behind a stream of ``length``
    events: ``interval - 1`` events before its end, the most a cold load can replay."""
    version = length - interval + 1
    record = (await store.read_stream(STREAM, version - 1))[0]
    event = to_domain_event(record)
    assert isinstance(event, ProductRestocked | StockReserved | StockReleased)
    product = Product(PRODUCT)
    product.restore_state({"available": event.available_after}, version)
    await _snapshots_of(store).save_snapshot(
        sealed(STREAM, version, Product.SNAPSHOT_VERSION, product.snapshot_state())
    )


async def measure_cold_start(
    urls: Sequence[str], length: int, intervals: Sequence[int], repeats: int, warm_orders: int
) -> list[ColdStart]:
    """Per snapshot interval (0: none), on a store of its own (``urls``, one per interval):
    ``repeats`` restarts, each the first order on the long product and then
    ``warm_orders`` more on it; restarts take turns between the intervals, each from the
    worst snapshot for its interval.

    A restart opens the store anew (new connections, as a new process has: their first
    statements cost more) with a new bus (an empty cache), under the gateway's garbage
    collector settings, and runs one order on another product first: the costs that the
    first command of a process pays whatever its stream (the writer's first append and
    the like) are not what a long stream costs. The first order on the long product and
    the warm ones after it are each built before their clock starts and timed the same way.
    """
    colds: list[list[tuple[float, float]]] = [[] for _ in intervals]
    warms: list[list[tuple[float, float]]] = [[] for _ in intervals]
    for url in urls:
        store = await open_store(url)
        try:
            await build_stream(store, length)
            await bootstrap(store).dispatch(RestockProduct(product_id=ELSEWHERE, quantity=RESTOCK))
        finally:
            await store.close()
    with gateway_gc_settings():
        for repeat in range(repeats):
            current = length + repeat * (1 + warm_orders)
            for url, interval, cold, warm in zip(urls, intervals, colds, warms, strict=True):
                if interval:
                    # Written by the "previous process", long before the restart.
                    store = await open_store(url)
                    try:
                        await save_worst_snapshot(store, current, interval)
                    finally:
                        await store.close()
                store = await open_store(url)
                try:
                    bus = bootstrap(
                        store, snapshots=Snapshots(_LoadOnly(_snapshots_of(store)), interval)
                    )
                    await bus.dispatch(order(ELSEWHERE))
                    cold.append(await _timed(bus, order()))
                    warm += [await _timed(bus, order()) for _ in range(warm_orders)]
                finally:
                    await store.close()
    taking, writes = await measure_snapshot_writes(urls, intervals, repeats * warm_orders)
    return [
        ColdStart(
            length,
            interval,
            statistics.median(ms for ms, _ in cold),
            statistics.median(ms for ms, _ in warm),
            statistics.median(cpu for _, cpu in cold),
            statistics.median(cpu for _, cpu in warm),
            statistics.fmean(taking_ms),
            statistics.median(writes_ms) if writes_ms else 0.0,
        )
        for interval, cold, warm, taking_ms, writes_ms in zip(
            intervals, colds, warms, taking, writes, strict=True
        )
    ]


async def measure_snapshot_writes(
    urls: Sequence[str], intervals: Sequence[int], orders: int
) -> tuple[list[list[float]], list[list[float]]]:
    """Per interval, on its store: ``orders`` warm orders on the long product while
    snapshots are taken every interval, in blocks that take turns between the intervals;
    their latencies and the snapshot writes' times (ms)."""
    block = 20
    taking: list[list[float]] = [[] for _ in intervals]
    writes: list[list[float]] = []
    stores = [await open_store(url) for url in urls]
    try:
        timed = [_TimedWrites(_snapshots_of(store)) for store in stores]
        snapshots = [Snapshots(t, n) for t, n in zip(timed, intervals, strict=True)]
        buses = [bootstrap(store, snapshots=s) for store, s in zip(stores, snapshots, strict=True)]
        with gateway_gc_settings():
            for bus in buses:
                await bus.dispatch(order())  # loads the product: the cold start is measured
            for _ in range(0, orders, block):
                for bus, measured, kept in zip(buses, taking, snapshots, strict=True):
                    measured += [(await _timed(bus, order()))[0] for _ in range(block)]
                    await kept.drain()
        writes = [t.writes_ms for t in timed]
    finally:
        for store in stores:
            await store.close()
    return taking, writes


async def _timed(bus: CommandBus, command: CreateOrder) -> tuple[float, float]:
    """``command``'s latency and the process's CPU time over it (all threads), in ms."""
    cpu, started = time.process_time(), time.perf_counter()
    await bus.dispatch(command)
    return (time.perf_counter() - started) * 1e3, (time.process_time() - cpu) * 1e3


def order(product: str = PRODUCT) -> CreateOrder:
    return CreateOrder.model_validate(order_input(product, str(uuid.uuid4())))


async def measure(folder: Path, lengths: Sequence[int], cached: bool, orders: int) -> list[Run]:
    """One store per stream length; orders alternate between them, so that the disk's and
    the machine's noise falls on every length alike."""
    stores = [await SQLiteEventStore.open(folder / f"{n}-{cached}.db") for n in lengths]
    try:
        for store, length in zip(stores, lengths, strict=True):
            await build_stream(store, length)
        buses = [bootstrap(store, cache_capacity=10_000 if cached else 0) for store in stores]
        firsts: list[float] = []
        for bus in buses:
            started = time.perf_counter()
            await bus.dispatch(order())
            firsts.append((time.perf_counter() - started) * 1e3)
        seconds: list[list[float]] = [[] for _ in buses]
        for _ in range(orders):
            for bus, measured in zip(buses, seconds, strict=True):
                command = order()
                started = time.perf_counter()
                await bus.dispatch(command)
                measured.append(time.perf_counter() - started)
        for store, length in zip(stores, lengths, strict=True):
            assert len(await store.read_stream(STREAM, length)) == orders + 1
    finally:
        for store in stores:
            await store.close()
    return [
        Run(length, cached, first, Latencies.of(measured))
        for length, first, measured in zip(lengths, firsts, seconds, strict=True)
    ]


async def main_async(orders: int, uncached_orders: int, long: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = []
        for cached, count in ((True, orders), (False, uncached_orders)):
            short, longer = await measure(folder, (SHORT, long), cached, count)
            rows.append((short, longer))

    print(f"CreateOrder on SQLite, one at a time; stream of {SHORT} vs {long:,} events")
    print(
        f"{'':<26}{'first':>9}{'p50':>9}{'p99':>9}   {'first':>9}{'p50':>9}{'p99':>9}"
        f"   {'p50 ratio':>9}"
    )
    print(f"{'':<26}{f'--- {SHORT} events (ms) ---':>27}   {f'--- {long:,} events (ms) ---':>27}")
    for short, longer in rows:
        label = "cache on (10,000 aggr.)" if short.cached else "cache off (capacity 0)"
        print(
            f"{label:<26}{short.first_ms:>9.2f}{short.latency.p50_ms:>9.2f}"
            f"{short.latency.p99_ms:>9.2f}   {longer.first_ms:>9.2f}"
            f"{longer.latency.p50_ms:>9.2f}{longer.latency.p99_ms:>9.2f}"
            f"   {longer.latency.p50_ms / short.latency.p50_ms:>8.2f}x"
        )
    print("first = the first order, which loads the product from the store into the cache")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.stream_length",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--orders", type=int, default=300, help="measured orders, cache on")
    parser.add_argument(
        "--uncached-orders", type=int, default=10, help="measured orders, cache off"
    )
    parser.add_argument("--long", type=int, default=100_000, help="events in the long stream")
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.orders, args.uncached_orders, args.long))


if __name__ == "__main__":
    main()
