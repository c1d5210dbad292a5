"""Subscribe over SQLite, whose catching-up subscriptions read plain rows
(``server.stores.event_rows``) where other stores hand over ``RecordedEvent``s: the same
messages, the same filters and checkpoints, the same gapless handoff to live delivery."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from orders.v1 import event_stream_service_pb2, events_pb2

from server.app import Gateway
from server.rpc.mapping import event_response
from server.rpc.subscription_hub import HubTuning
from server.stores.sqlite import SQLiteEventStore
from tests.clients import Clients, item, order_request
from tests.subscription_support import (
    StreamReader,
    connect,
    identities,
    run_writers,
    running_gateway,
    stored,
)

# Pages of 7: a few dozen events make a multi-page catch-up.
SMALL = HubTuning(page_size=7, buffer_size=16, poll_interval=0.05, checkpoint_interval=0.2)


@contextlib.asynccontextmanager
async def sqlite_gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Clients]]:
    store = await SQLiteEventStore.open(tmp_path / "events.db")
    async with running_gateway(store, SMALL) as gateway, connect(gateway) as clients:
        yield gateway, clients


async def recorded_messages(gateway: Gateway) -> list[events_pb2.Event]:
    """Every stored event as the record path maps it (live delivery, other stores)."""
    records = await gateway.store.read_all(0, 10_000)
    return [event_response(event_stream_service_pb2.SubscribeResponse, r).event for r in records]


async def test_catch_up_sends_every_event_as_its_record_maps(tmp_path: Path) -> None:
    async with sqlite_gateway(tmp_path) as (gateway, clients):
        await clients.restock("sku-1", 10)
        await clients.restock("sku-2", 20)
        for _ in range(6):
            created = await clients.create(order_request(item("sku-1"), item("sku-2", 2)))
        await clients.cancel(created[0].order_created.order_id)
        expected = await recorded_messages(gateway)
        head = expected[-1].position
        assert head == 2 + 6 * 3 + 3

        everything = StreamReader.open(clients)
        assert await everything.through(head) == expected
        assert await everything.next_checkpoint() == head, "caught up: a checkpoint at the head"

        by_type = StreamReader.open(clients, event_types=["StockReserved", "OrderCancelled"])
        wanted = {"StockReserved", "OrderCancelled"}
        assert await by_type.through(head) == [e for e in expected if e.event_type in wanted]

        by_stream = StreamReader.open(clients, stream_id="product-sku-2", after_position=3)
        assert await by_stream.through(head) == [
            e for e in expected if e.stream_id == "product-sku-2" and e.position > 3
        ]

        beyond = StreamReader.open(clients, after_position=head + 5)
        assert await beyond.next_checkpoint() == head, "never a checkpoint beyond the head"
        for reader in (everything, by_type, by_stream, beyond):
            reader.call.cancel()


async def test_handoff_under_concurrent_writers_has_no_gap_and_no_duplicate(
    tmp_path: Path,
) -> None:
    async with sqlite_gateway(tmp_path) as (gateway, clients):
        writing = asyncio.create_task(run_writers(clients, writers=4, orders=60))
        readers: list[StreamReader] = []
        # Subscriptions opened all along the writes catch up from many distances behind
        # the head, each through several pages of rows, then go live.
        next_subscription = 0
        while not writing.done():
            if await gateway.store.head_position() >= next_subscription:
                readers.append(StreamReader.open(clients))
                next_subscription += 30
            await asyncio.sleep(0.002)
        await writing
        head = await gateway.store.head_position()
        assert head == 4 * (1 + 2 * 60)
        expected = await stored(gateway.store)
        assert [position for position, _ in expected] == list(range(1, head + 1))
        assert len(readers) >= 5
        for reader in readers:
            assert identities(await reader.through(head)) == expected
            reader.call.cancel()


async def test_a_start_past_the_largest_stored_position_delivers_nothing(tmp_path: Path) -> None:
    # after_position is a uint64; the store keeps positions in 64-bit signed integers.
    # Nothing lies beyond them, so such a start is answered with checkpoints only.
    async with sqlite_gateway(tmp_path) as (_, clients):
        head = len(await clients.restock("sku-1", 1))
        for request in [{}, {"stream_id": "product-sku-1"}]:
            for after in [2**63, 2**64 - 1]:
                reader = StreamReader.open(clients, after_position=after, **request)
                assert await reader.next_checkpoint() == head
                head += len(await clients.restock("sku-1", 1))
                assert await reader.through(head) == []
                reader.call.cancel()
