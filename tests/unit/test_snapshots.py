"""Snapshots: a product with a long stream is rebuilt from its latest snapshot plus the
events after it; snapshots are written in the background, never holding up a command,
and one in another schema version is ignored."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from domain.aggregates import Product
from domain.commands import RestockProduct
from domain.errors import StoreError, StoreUnavailableError
from domain.ports import EventPayload, RecordedEvent, Snapshot
from domain.snapshots import MAX_PENDING, Snapshots, opened, sealed
from server.bootstrap import bootstrap
from server.stores.memory import MemoryEventStore
from server.stores.sqlite import SQLiteEventStore
from tests.subscription_support import connect, running_gateway

INTERVAL = 10


class ReadCountingStore(MemoryEventStore):
    """Remembers from which version each stream was read (the memory store reads the
    events after a snapshot through ``read_stream`` too)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, int]] = []

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        self.reads.append((stream_id, after_version))
        return await super().read_stream(stream_id, after_version)


async def restock(store: MemoryEventStore, snapshots: Snapshots, times: int) -> int:
    """Restock "p" ``times`` times, one unit each, through a fresh bus (a cold cache);
    returns the last event's available_after."""
    bus = bootstrap(store, snapshots=snapshots)
    for _ in range(times):
        events = await bus.dispatch(RestockProduct(product_id="p", quantity=1))
    await snapshots.drain()
    return int(json.loads(events[-1].data)["available_after"])


async def test_a_cold_product_starts_from_its_latest_snapshot() -> None:
    store = ReadCountingStore()
    await restock(store, Snapshots(store, INTERVAL), 25)
    snapshot = await store.load_snapshot("product-p")
    assert snapshot is not None and snapshot.stream_version == 20
    assert snapshot.schema_version == Product.SNAPSHOT_VERSION

    store.reads.clear()
    assert await restock(store, Snapshots(store, INTERVAL), 1) == 26
    assert store.reads == [("product-p", 20)], "only the events after the snapshot are read"


async def test_without_snapshots_the_whole_stream_is_read() -> None:
    store = ReadCountingStore()
    await restock(store, Snapshots(store, 0), 25)
    assert await store.load_snapshot("product-p") is None
    store.reads.clear()
    assert await restock(store, Snapshots(store, 0), 1) == 26
    assert store.reads == [("product-p", 0)]


@pytest.mark.parametrize("schema_version", [Product.SNAPSHOT_VERSION - 1, 99])
async def test_a_snapshot_in_another_version_is_ignored_not_misread(schema_version: int) -> None:
    store = ReadCountingStore()
    await restock(store, Snapshots(None, INTERVAL), 25)
    # A shape this code does not know: misread, it would say 1,000,000 units are left.
    stale = Snapshot("product-p", 24, schema_version, b'{"available": 1000000, "v": 9}')
    await store.save_snapshot(stale)
    store.reads.clear()
    assert await restock(store, Snapshots(store, INTERVAL), 1) == 26
    assert store.reads == [("product-p", 24), ("product-p", 0)], "read again, from the start"


def flipped(data: bytes, at: int, bit: int) -> bytes:
    return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1 :]


@pytest.mark.parametrize(
    "damage",
    [
        # One bit of the state: {"available": 25} read as {"available": 35}.
        lambda data: flipped(data, data.rindex(b"2"), 0),
        lambda data: flipped(data, 3, 1),  # one bit of the digest
        lambda data: b"\x00",  # the data replaced
        lambda data: data.partition(b" ")[2],  # the digest lost: 1's unsealed form
        lambda data: "garbage text",  # a SQLite row edited to hold text, read back as str
    ],
    ids=["state-bit", "digest-bit", "garbage", "unsealed", "text"],
)
async def test_a_damaged_snapshot_is_ignored_and_the_stream_replayed(
    damage: Callable[[bytes], bytes], caplog: pytest.LogCaptureFixture
) -> None:
    store = ReadCountingStore()
    await restock(store, Snapshots(None, INTERVAL), 20)  # 20 units, no snapshot yet
    good = sealed("product-p", 20, Product.SNAPSHOT_VERSION, {"available": 25})
    assert opened(good) == {"available": 25}
    damaged = dataclasses.replace(good, data=damage(good.data))
    assert opened(damaged) is None
    await store.save_snapshot(damaged)

    store.reads.clear()
    with caplog.at_level(logging.WARNING, logger="order_gateway.snapshots"):
        # Read as it is, the snapshot would have said 25 + 1.
        assert await restock(store, Snapshots(store, INTERVAL), 1) == 21
    assert store.reads == [("product-p", 20), ("product-p", 0)], "read again, from the start"
    assert "snapshot of product-p at version 20 is damaged" in caplog.text


def test_a_snapshot_is_sealed_to_its_stream_and_version() -> None:
    good = sealed("product-p", 20, Product.SNAPSHOT_VERSION, {"available": 25})
    assert opened(dataclasses.replace(good, stream_id="product-q")) is None
    assert opened(dataclasses.replace(good, stream_version=40)) is None


async def test_an_older_snapshot_never_replaces_a_newer_one() -> None:
    store = MemoryEventStore()
    await store.save_snapshot(Snapshot("s", 20, 1, b"{}"))
    await store.save_snapshot(Snapshot("s", 10, 1, b"{}"))
    kept = await store.load_snapshot("s")
    assert kept is not None and kept.stream_version == 20


class StuckSnapshotStore(MemoryEventStore):
    """A snapshot write that does not finish until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.started = 0

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        self.started += 1
        await self.release.wait()
        await super().save_snapshot(snapshot)


async def test_commands_never_wait_for_a_snapshot_write() -> None:
    store = StuckSnapshotStore()
    snapshots = Snapshots(store, INTERVAL)
    bus = bootstrap(store, snapshots=snapshots)
    for _ in range(3 * INTERVAL):
        await asyncio.wait_for(bus.dispatch(RestockProduct(product_id="p", quantity=1)), 5)
    # The writes run in a task of their own, started when the loop next runs: the memory
    # store never suspends a command, and since Python 3.12 wait_for no longer runs its
    # awaitable in a task of its own, so nothing above had to let it start.
    await asyncio.sleep(0)
    # One write at a time: the snapshot at 10 is held up; the one at 30 replaced the one
    # at 20 while it waited. Writes side by side each held a pooled connection (on
    # PostgreSQL, a lock on the snapshots table then left no connection for the commands).
    assert store.started == 1, "the snapshot at 10 being written, the others waiting"
    store.release.set()
    await snapshots.drain()
    assert store.started == 2
    kept = await store.load_snapshot("product-p")
    assert kept is not None and kept.stream_version == 30


async def test_snapshots_waiting_are_bounded_and_each_streams_latest_is_kept() -> None:
    store = StuckSnapshotStore()
    snapshots = Snapshots(store, INTERVAL)
    held = Snapshot("held", 1, 1, b"{}")
    snapshots.take([held])
    await asyncio.sleep(0)
    snapshots.take(Snapshot(f"s-{n}", 1, 1, b"{}") for n in range(MAX_PENDING + 5))
    snapshots.take([Snapshot("s-10", 2, 1, b"{}")])
    store.release.set()
    await snapshots.drain()
    # The held write, then MAX_PENDING of the others: the oldest five were dropped.
    assert store.started == 1 + MAX_PENDING
    assert await store.load_snapshot("s-4") is None
    assert await store.load_snapshot("s-5") is not None
    kept = await store.load_snapshot("s-10")
    assert kept is not None and kept.stream_version == 2


class FailingSnapshotStore(MemoryEventStore):
    async def save_snapshot(self, snapshot: Snapshot) -> None:
        raise OSError("disk full")


async def test_a_snapshot_that_fails_is_logged_and_changes_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FailingSnapshotStore()
    with caplog.at_level(logging.WARNING, "order_gateway.snapshots"):
        assert await restock(store, Snapshots(store, INTERVAL), 12) == 12
    assert "snapshot of product-p not saved" in caplog.text


class UnavailableSnapshotStore(MemoryEventStore):
    async def save_snapshot(self, snapshot: Snapshot) -> None:
        raise StoreUnavailableError("connection refused")


async def test_a_snapshot_lost_to_an_unavailable_store_is_one_line_not_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A database restarting under load fails the snapshots being written: an operational
    event the store reports itself, not a bug to dump a stack for."""
    store = UnavailableSnapshotStore()
    with caplog.at_level(logging.WARNING, "order_gateway.snapshots"):
        assert await restock(store, Snapshots(store, INTERVAL), 12) == 12
    assert "snapshot of product-p not saved: connection refused" in caplog.text
    assert "Traceback" not in caplog.text


async def test_a_restarted_gateway_continues_from_the_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = await SQLiteEventStore.open(path)
    async with (
        running_gateway(store, snapshot_interval=INTERVAL) as gateway,
        connect(gateway) as clients,
    ):
        for _ in range(25):
            await clients.restock("p", 2)
    # Stopping the gateway waited for the snapshot writes.
    reopened = await SQLiteEventStore.open(path)
    snapshot = await reopened.load_snapshot("product-p")
    assert snapshot is not None and snapshot.stream_version == 20
    assert opened(snapshot) == {"available": 40}
    async with (
        running_gateway(reopened, snapshot_interval=INTERVAL) as gateway,
        connect(gateway) as clients,
    ):
        restocked = await clients.restock("p", 1)
    assert restocked[0].product_restocked.available_after == 51
    assert restocked[0].stream_version == 26


class UnreadableSnapshotStore(ReadCountingStore):
    async def load_snapshot_and_events(
        self, stream_id: str
    ) -> tuple[Snapshot | None, list[EventPayload]]:
        raise StoreError("permission denied for table snapshots")


async def test_snapshots_that_cannot_be_read_mean_a_full_replay_not_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = UnreadableSnapshotStore()
    await restock(store, Snapshots(None, INTERVAL), 5)
    with caplog.at_level(logging.WARNING, "order_gateway.snapshots"):
        assert await restock(store, Snapshots(store, INTERVAL), 1) == 6
    assert store.reads[-1] == ("product-p", 0)
    assert "snapshot of product-p not read" in caplog.text
