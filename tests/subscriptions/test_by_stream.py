"""Subscribe with a ``stream_id`` on the durable stores: the catch-up reads that stream by
index (``server.stores.event_rows.StreamRowReader``) instead of the whole log, and delivers the
same events, checkpoints and gapless handoff to live delivery as any subscription."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from domain.ports import EventStore
from server.rpc.subscription_hub import HubTuning
from server.stores.factory import open_store
from tests.subscription_support import (
    StreamReader,
    connect,
    identities,
    run_writers,
    running_gateway,
    write_orders,
)

# Pages of 7: a stream of a few dozen events takes several pages.
SMALL = HubTuning(page_size=7, buffer_size=16, poll_interval=0.05, checkpoint_interval=0.2)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/events.db"
    else:
        url = request.getfixturevalue("fresh_postgres_url")
    # Closed by the gateway that serves it.
    yield await open_store(url)


async def stream_events(store: EventStore, stream_id: str) -> list[tuple[int, str]]:
    """(position, event_id) of every committed event of ``stream_id``, from the store."""
    return [(record.position, record.event_id) for record in await store.read_stream(stream_id)]


def record_reads(store: EventStore, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every whole-log read the store serves from now on: (method, after_position)."""
    reads: list[tuple[str, int]] = []
    for name in ("read_all", "read_all_rows"):
        read: Callable[..., Awaitable[Any]] = getattr(store, name)

        async def recorded(
            after_position: int = 0, limit: int = 1000, *, _name: str = name, _read: Any = read
        ) -> Any:
            reads.append((_name, after_position))
            return await _read(after_position, limit)

        monkeypatch.setattr(store, name, recorded)
    return reads


async def test_a_stream_subscriber_catches_up_without_reading_the_log_then_goes_live(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_gateway(store, SMALL) as gateway, connect(gateway) as clients:
        await run_writers(clients, writers=3, orders=12)
        head = await store.head_position()
        assert head == 3 * (1 + 2 * 12)
        wanted = await stream_events(store, "product-w-1")
        assert len(wanted) == 13  # more than a page

        reads = record_reads(store, monkeypatch)
        reader = StreamReader.open(clients, stream_id="product-w-1")
        assert identities(await reader.through(head)) == wanted
        assert await reader.next_checkpoint() == head
        # The subscription read its stream alone; the hub reads the log only from the head
        # on, once the subscription is live.
        assert all(after >= head for _, after in reads), reads

        await write_orders(clients, "w-1", 2)
        await write_orders(clients, "w-2", 1)
        later = await stream_events(store, "product-w-1")
        assert identities(await reader.through(later[-1][0])) == later
        reader.call.cancel()


async def test_a_stream_without_events_yet_checkpoints_at_the_head_then_delivers_its_first(
    store: EventStore,
) -> None:
    async with running_gateway(store, SMALL) as gateway, connect(gateway) as clients:
        await run_writers(clients, writers=2, orders=10)
        head = await store.head_position()
        reader = StreamReader.open(clients, stream_id="product-late", after_position=3)
        assert await reader.next_checkpoint() == head
        assert reader.events == []
        await clients.restock("late", 5)
        first = await stream_events(store, "product-late")
        assert identities(await reader.through(first[0][0])) == first
        reader.call.cancel()


async def test_stream_subscribers_opened_during_writes_miss_nothing_and_repeat_nothing(
    store: EventStore,
) -> None:
    async with running_gateway(store, SMALL) as gateway, connect(gateway) as clients:
        writing = asyncio.create_task(run_writers(clients, writers=4, orders=40))
        readers: list[StreamReader] = []
        reserved_only: list[StreamReader] = []
        next_subscription = 0
        while not writing.done():
            if await store.head_position() >= next_subscription:
                readers.append(StreamReader.open(clients, stream_id="product-w-0"))
                reserved_only.append(
                    StreamReader.open(
                        clients, stream_id="product-w-0", event_types=["StockReserved"]
                    )
                )
                next_subscription += 25
            await asyncio.sleep(0.002)
        await writing
        head = await store.head_position()
        assert head == 4 * (1 + 2 * 40)
        wanted = await stream_events(store, "product-w-0")
        assert len(wanted) == 41
        assert len(readers) >= 4
        for reader in readers:
            assert identities(await reader.through(head)) == wanted
            reader.call.cancel()
        for reader in reserved_only:
            events = await reader.through(head)
            assert identities(events) == wanted[1:]  # all but the restock
            assert {event.event_type for event in events} == {"StockReserved"}
            reader.call.cancel()
