"""Subscribe across replicas: two gateways on one PostgreSQL database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from domain.ports import EventStore
from server.rpc.subscription_hub import HubTuning
from server.stores.factory import open_store
from tests.clients import Clients
from tests.subscription_support import (
    StreamReader,
    connect,
    identities,
    run_writers,
    running_gateway,
    stored,
)

pytestmark = pytest.mark.postgres

# A poll far longer than any wait in these tests: events committed through the other
# replica can only arrive in time through LISTEN/NOTIFY.
NOTIFY_ONLY = HubTuning(page_size=50, poll_interval=600.0, checkpoint_interval=0.5)


@contextlib.asynccontextmanager
async def two_replicas(url: str) -> AsyncIterator[tuple[EventStore, Clients, Clients]]:
    """Two gateways, each with its own store on one database: replica A's store and clients
    for A and B."""
    store_a = await open_store(url)
    store_b = await open_store(url)
    async with (
        running_gateway(store_a, NOTIFY_ONLY) as replica_a,
        running_gateway(store_b, NOTIFY_ONLY) as replica_b,
        connect(replica_a) as clients_a,
        connect(replica_b) as clients_b,
    ):
        yield store_a, clients_a, clients_b


async def test_two_replicas_with_writers_on_both_deliver_the_same_sequence(
    fresh_postgres_url: str,
) -> None:
    async with two_replicas(fresh_postgres_url) as (store_a, clients_a, clients_b):
        await run_writers(clients_a, writers=2, orders=3, prefix="early")
        reader_a = StreamReader.open(clients_a)
        reader_b = StreamReader.open(clients_b)
        await reader_a.next_checkpoint()
        await reader_b.next_checkpoint()

        async with asyncio.TaskGroup() as group:
            group.create_task(run_writers(clients_a, writers=3, orders=15, prefix="a"))
            group.create_task(run_writers(clients_b, writers=3, orders=15, prefix="b"))
            # A subscriber arriving mid-way catches up, then goes live, on replica B.
            await asyncio.sleep(0.05)
            late_b = StreamReader.open(clients_b)

        expected = await stored(store_a)
        head = expected[-1][0]
        assert [position for position, _ in expected] == list(range(1, head + 1))
        assert head == 2 * 7 + 6 * 31
        for reader in (reader_a, reader_b, late_b):
            assert identities(await reader.through(head)) == expected
            reader.call.cancel()


async def test_an_event_committed_on_one_replica_reaches_a_live_subscriber_on_the_other(
    fresh_postgres_url: str,
) -> None:
    async with two_replicas(fresh_postgres_url) as (_, clients_a, clients_b):
        on_b = StreamReader.open(clients_b, event_types=["ProductRestocked"])
        assert await on_b.next_checkpoint() == 0
        committed = await clients_a.restock("sku-1", 3)
        assert identities(await on_b.through(1)) == identities(committed)
        on_b.call.cancel()
