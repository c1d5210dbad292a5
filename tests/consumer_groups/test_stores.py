"""Consumer-group records on every store, and what survives a restart of the gateway."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc
from orders.v1 import inventory_command_service_pb2 as inventory_pb
from orders.v1 import inventory_command_service_pb2_grpc as inventory_grpc

from domain.ports import EventStore
from server.consumer_groups.model import GroupRecord, GroupSettings, ParkedEvent
from server.consumer_groups.ports import ConsumerGroupStore
from server.consumer_groups.stores import open_group_store
from server.stores.factory import open_store
from tests.group_support import group_gateway, group_settings, member

Opener = Callable[[], Awaitable[EventStore]]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def open_events(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens the same store again each time it is called (memory: the same object)."""
    if request.param == "memory":
        from server.stores.memory import MemoryEventStore

        shared = MemoryEventStore()

        async def memory() -> EventStore:
            return shared

        return memory
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'groups.db'}"
    else:
        request.applymarker(pytest.mark.postgres)
        url = request.getfixturevalue("fresh_postgres_url")

    async def reopen() -> EventStore:
        return await open_store(url)

    return reopen


@pytest.fixture
async def groups_store(open_events: Opener) -> AsyncIterator[ConsumerGroupStore]:
    events = await open_events()
    store = await open_group_store(events)
    yield store
    await store.close()
    await events.close()


def _record(name: str, **settings: object) -> GroupRecord:
    return GroupRecord(
        name,
        GroupSettings(**settings),  # type: ignore[arg-type]
        dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC),
        7,
    )


def _parked(event_id: str, position: int, seconds: int) -> ParkedEvent:
    return ParkedEvent(
        event_id,
        position,
        position % 4,
        f"reason {event_id}",
        dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=seconds),
    )


async def test_groups_are_created_once_listed_and_deleted(
    groups_store: ConsumerGroupStore,
) -> None:
    wanted = _record("b", event_types=("OrderCreated",), partitions=3, ack_timeout=1.5)
    assert await groups_store.create_group(wanted) == wanted
    # A second create keeps the first record.
    assert await groups_store.create_group(_record("b", partitions=9)) == wanted
    await groups_store.create_group(_record("a"))
    assert [g.name for g in await groups_store.list_groups()] == ["a", "b"]
    assert await groups_store.get_group("b") == wanted
    assert await groups_store.get_group("zz") is None
    assert await groups_store.delete_group("b")
    assert not await groups_store.delete_group("b")
    assert await groups_store.get_group("b") is None


async def test_checkpoints_only_move_forward_and_go_with_their_group(
    groups_store: ConsumerGroupStore,
) -> None:
    await groups_store.create_group(_record("g"))
    await groups_store.save_checkpoints("g", {0: 10, 1: 5})
    await groups_store.save_checkpoints("g", {0: 8, 2: 3})
    assert await groups_store.load_checkpoints("g") == {0: 10, 1: 5, 2: 3}
    await groups_store.delete_group("g")
    await groups_store.save_checkpoints("g", {0: 99})  # a late write for a deleted group
    await groups_store.create_group(_record("g"))
    assert await groups_store.load_checkpoints("g") == {}


async def test_parked_events_replay_longest_parked_first_within_the_limit(
    groups_store: ConsumerGroupStore,
) -> None:
    await groups_store.create_group(_record("g"))
    await groups_store.park("g", [_parked("e3", 3, 30), _parked("e1", 1, 10)])
    await groups_store.park("g", [_parked("e2", 2, 20)])
    assert await groups_store.parked_count("g") == 3
    assert await groups_store.replay_parked("g", 2) == 2
    first = await groups_store.replaying("g", 10)
    assert [e.event_id for e in first] == ["e1", "e2"]
    assert all(e.replaying for e in first)
    assert first[0].reason == "reason e1" and first[0].partition == 1
    assert await groups_store.parked_count("g") == 1
    assert [e.event_id for e in await groups_store.replaying("g", 1)] == ["e1"]
    # Settled after the replay: gone. Parked again: back among the parked.
    await groups_store.unpark("g", ["e1"])
    await groups_store.park("g", [_parked("e2", 2, 40)])
    assert await groups_store.replaying("g", 10) == []
    assert await groups_store.parked_count("g") == 2
    assert await groups_store.replay_parked("g", 0) == 2
    assert [e.event_id for e in await groups_store.replaying("g", 10)] == ["e3", "e2"]
    await groups_store.delete_group("g")
    assert await groups_store.parked_count("g") == 0


async def _restock(channel: grpc.aio.Channel, count: int) -> list[str]:
    stub = inventory_grpc.InventoryCommandServiceStub(channel)
    ids = []
    for n in range(count):
        request = inventory_pb.RestockProductRequest(product_id=f"p{n % 3}", quantity=1)
        ids += [r.event.event_id async for r in stub.RestockProduct(request)]
    return ids


async def test_after_a_restart_delivery_resumes_above_the_stored_checkpoint(
    open_events: Opener,
) -> None:
    async with (
        group_gateway(await open_events()) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        await stub.CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(name="g", settings=group_settings(partitions=1))
        )
        ids = await _restock(channel, 6)
        async with member(stub, "g") as consumer:
            received = await consumer.deliveries(3)  # one per stream p0, p1, p2
            assert [d.event.event_id for d in received] == ids[:3]
            await consumer.ack(ids[0], ids[2])
            await consumer.nack(ids[1], action=pb.NACK_ACTION_PARK, reason="poison")
            await consumer.deliveries(2)  # ids[3] and ids[5] (p0, p2)
            await asyncio.sleep(0.3)
    # The gateway stopped with ids[3..5] unsettled: they come again, nothing before them.
    async with (
        group_gateway(await open_events()) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        group = (await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))).group
        assert group.parked == 1
        assert group.checkpoint == 3
        async with member(stub, "g") as consumer:
            again = await consumer.deliveries(3)
            assert sorted(d.event.event_id for d in again) == sorted(ids[3:])
            assert {d.attempt for d in again} == {1}
            await consumer.ack(*ids[3:])
            replay = await stub.ReplayParked(pb.ReplayParkedRequest(name="g"))
            assert replay.replayed == 1
            assert (await consumer.delivery()).event.event_id == ids[1]
    # A replay interrupted by a restart is not lost: it is delivered again.
    async with (
        group_gateway(await open_events()) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        async with member(stub, "g") as consumer:
            replayed = await consumer.delivery()
            assert replayed.event.event_id == ids[1]
            await consumer.ack(ids[1])
            await asyncio.sleep(0.3)
            group = (await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))).group
            assert group.parked == 0
            assert group.checkpoint == group.head_position == 6
