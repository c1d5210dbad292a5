"""Consumer-group records on every store, and what survives a restart of the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import psycopg
import pytest
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc
from orders.v1 import inventory_command_service_pb2 as inventory_pb
from orders.v1 import inventory_command_service_pb2_grpc as inventory_grpc
from psycopg.types.json import Jsonb

from domain.ports import EventStore
from server.consumer_groups.model import FailedAttempts, GroupRecord, GroupSettings, ParkedEvent
from server.consumer_groups.ports import ConsumerGroupStore
from server.consumer_groups.records import settings_fields, settings_json
from server.consumer_groups.stores import open_group_store
from server.stores import postgres_schema, sqlite_schema
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
    g = await groups_store.create_group(_record("g"))
    await groups_store.save_checkpoints(g, {0: 10, 1: 5})
    await groups_store.save_checkpoints(g, {0: 8, 2: 3})
    assert await groups_store.load_checkpoints("g") == {0: 10, 1: 5, 2: 3}
    await groups_store.delete_group("g")
    await groups_store.save_checkpoints(g, {0: 99})  # a late write for a deleted group
    await groups_store.create_group(_record("g"))
    assert await groups_store.load_checkpoints("g") == {}


async def test_parked_events_replay_longest_parked_first_within_the_limit(
    groups_store: ConsumerGroupStore,
) -> None:
    g = await groups_store.create_group(_record("g"))
    await groups_store.park(g, [_parked("e3", 3, 30), _parked("e1", 1, 10)])
    await groups_store.park(g, [_parked("e2", 2, 20)])
    assert await groups_store.parked_count("g") == 3
    assert await groups_store.replay_parked("g", 2) == 2
    first = await groups_store.replaying("g", 10)
    assert [e.event_id for e in first] == ["e1", "e2"]
    assert all(e.replaying for e in first)
    assert first[0].reason == "reason e1" and first[0].partition == 1
    assert await groups_store.parked_count("g") == 1
    assert [e.event_id for e in await groups_store.replaying("g", 1)] == ["e1"]
    # Settled after the replay: gone. Parked again: back among the parked.
    await groups_store.unpark(g, ["e1"])
    await groups_store.park(g, [_parked("e2", 2, 40)])
    assert await groups_store.replaying("g", 10) == []
    assert await groups_store.parked_count("g") == 2
    assert await groups_store.replay_parked("g", 0) == 2
    assert [e.event_id for e in await groups_store.replaying("g", 10)] == ["e3", "e2"]
    # By partition (position % 4), the lowest replayed: what a checkpoint stays below.
    await groups_store.park(g, [_parked("e7", 7, 50)])
    await groups_store.replay_parked("g", 0)
    assert await groups_store.lowest_replaying("g") == {2: 2, 3: 3}
    await groups_store.delete_group("g")
    assert await groups_store.lowest_replaying("g") == {}
    assert await groups_store.parked_count("g") == 0


async def test_parked_events_above_checkpoints_are_listed_by_partition(
    groups_store: ConsumerGroupStore,
) -> None:
    g = await groups_store.create_group(_record("g"))
    # Partitions by position % 4: e5 and e9 in 1, e6 in 2, e3 in 3.
    await groups_store.park(g, [_parked(f"e{n}", n, n) for n in (3, 5, 6, 9)])
    await groups_store.replay_parked("g", 1)  # replayed or not, still parked
    above = await groups_store.parked_after("g", {1: 5, 2: 0})
    assert sorted(above) == [(1, "e9"), (2, "e6")]
    assert await groups_store.parked_after("g", {}) == []
    assert await groups_store.parked_after("other", {1: 0}) == []


def _failed(event_id: str, position: int, attempts: int) -> FailedAttempts:
    return FailedAttempts(event_id, position, position % 4, attempts)


async def _attempts(
    store: ConsumerGroupStore, name: str = "g", partitions: range | list[int] = range(4)
) -> dict[str, int]:
    loaded = await store.load_attempts(name, partitions)
    return {a.event_id: a.attempts for a in sorted(loaded, key=lambda a: a.event_id)}


async def test_failed_attempts_only_go_up_and_load_by_partition(
    groups_store: ConsumerGroupStore,
) -> None:
    g = await groups_store.create_group(_record("g"))
    other = await groups_store.create_group(_record("other"))
    await groups_store.save_attempts(g, [_failed("e1", 1, 1), _failed("e2", 2, 2)])
    # A later count replaces an earlier one, never a higher one; one event twice in a
    # batch keeps its highest.
    await groups_store.save_attempts(
        g, [_failed("e1", 1, 2), _failed("e2", 2, 1), _failed("e5", 5, 1), _failed("e5", 5, 3)]
    )
    await groups_store.save_attempts(other, [_failed("e1", 1, 4)])
    assert await _attempts(groups_store) == {"e1": 2, "e2": 2, "e5": 3}
    loaded = await groups_store.load_attempts("g", [1, 3])
    assert sorted(loaded, key=lambda a: a.event_id) == [
        FailedAttempts("e1", 1, 1, 2),
        FailedAttempts("e5", 5, 1, 3),
    ]
    assert await _attempts(groups_store, "g", [0, 3]) == {}
    assert await _attempts(groups_store, "other") == {"e1": 4}
    await groups_store.forget_attempts(g, ["e1", "unknown"])
    assert await _attempts(groups_store) == {"e2": 2, "e5": 3}


async def test_a_failure_s_retry_time_goes_with_its_count(
    groups_store: ConsumerGroupStore,
) -> None:
    g = await groups_store.create_group(_record("g"))

    async def retry_at() -> float:
        (loaded,) = await groups_store.load_attempts("g", [1])
        return loaded.retry_at

    nacked = 1_800_000_000.123456  # microseconds kept
    await groups_store.save_attempts(g, [FailedAttempts("e1", 1, 1, 1, nacked + 1)])
    assert await retry_at() == pytest.approx(nacked + 1, abs=1e-6)
    await groups_store.save_attempts(g, [FailedAttempts("e1", 1, 1, 2, nacked + 2)])
    assert await retry_at() == pytest.approx(nacked + 2, abs=1e-6)
    # A late write of an earlier failure changes neither the count nor its wait.
    await groups_store.save_attempts(g, [FailedAttempts("e1", 1, 1, 1, nacked + 9)])
    assert await retry_at() == pytest.approx(nacked + 2, abs=1e-6)
    # A timeout or a departure: delivered again at once.
    await groups_store.save_attempts(g, [FailedAttempts("e1", 1, 1, 3)])
    assert await retry_at() == 0.0


async def test_failed_attempts_go_with_settling_replaying_and_their_group(
    groups_store: ConsumerGroupStore,
) -> None:
    g = await groups_store.create_group(_record("g"))
    await groups_store.save_attempts(g, [_failed(f"e{n}", n, 2) for n in range(1, 6)])
    # Parked: settled, so its count is gone, and a replay of it starts at attempt 1.
    await groups_store.park(g, [_parked("e1", 1, 10), _parked("e2", 2, 20)])
    assert await _attempts(groups_store) == {"e3": 2, "e4": 2, "e5": 2}
    # A count written late, after the park (by a process the partition had moved away
    # from), is forgotten when the event is replayed; one not replayed yet stays.
    await groups_store.save_attempts(g, [_failed("e1", 1, 3), _failed("e2", 2, 3)])
    assert await groups_store.replay_parked("g", 1) == 1
    assert await _attempts(groups_store) == {"e2": 3, "e3": 2, "e4": 2, "e5": 2}
    # A replayed event that fails is counted again, and settled, forgotten with its park.
    await groups_store.save_attempts(g, [_failed("e1", 1, 1)])
    await groups_store.unpark(g, ["e1"])
    assert await _attempts(groups_store) == {"e2": 3, "e3": 2, "e4": 2, "e5": 2}
    await groups_store.delete_group("g")
    await groups_store.save_attempts(g, [_failed("e9", 9, 1)])  # late, for a deleted group
    await groups_store.create_group(_record("g"))
    assert await _attempts(groups_store) == {}


@pytest.mark.parametrize("limit", [0, 2], ids=["all", "as-many-as-parked"])
async def test_a_replay_forgets_counts_written_late_for_every_event_it_replays(
    groups_store: ConsumerGroupStore, limit: int
) -> None:
    # Counts written after the park (by a process the partitions had moved away from):
    # the replayed events start again at attempt 1, whichever way the limit says "all".
    g = await groups_store.create_group(_record("g"))
    await groups_store.park(g, [_parked("e1", 1, 10), _parked("e2", 2, 20)])
    await groups_store.save_attempts(g, [_failed("e1", 1, 3), _failed("e2", 2, 4)])
    await groups_store.save_attempts(g, [_failed("e3", 3, 2)])  # unsettled, never parked
    assert await groups_store.replay_parked("g", limit) == 2
    assert await _attempts(groups_store) == {"e3": 2}
    assert [e.event_id for e in await groups_store.replaying("g", 10)] == ["e1", "e2"]


async def test_a_deleted_group_s_late_writes_leave_the_group_created_again_alone(
    groups_store: ConsumerGroupStore,
) -> None:
    old = await groups_store.create_group(_record("g"))
    await groups_store.delete_group("g")
    new = await groups_store.create_group(
        dataclasses.replace(old, created_at=old.created_at + dt.timedelta(microseconds=1))
    )
    await groups_store.save_checkpoints(new, {0: 5})
    await groups_store.save_attempts(new, [_failed("e1", 1, 2), _failed("e2", 2, 2)])
    await groups_store.park(new, [_parked("e3", 3, 30), _parked("e4", 4, 40)])
    # What a runtime of the deleted group still writes (through another process, before
    # it learns of the deletion) writes, forgets and unparks nothing of the new group.
    await groups_store.save_checkpoints(old, {0: 70, 1: 71})
    await groups_store.save_attempts(old, [_failed("e1", 1, 4), _failed("e5", 5, 1)])
    await groups_store.forget_attempts(old, ["e2"])
    await groups_store.park(old, [_parked("e1", 1, 10), _parked("e6", 6, 60)])
    await groups_store.unpark(old, ["e3"])
    assert await groups_store.load_checkpoints("g") == {0: 5}
    assert await _attempts(groups_store) == {"e1": 2, "e2": 2}
    assert sorted(await groups_store.parked_after("g", {p: 0 for p in range(4)})) == [
        (0, "e4"),
        (3, "e3"),
    ]


async def test_a_sqlite_file_of_the_previous_schema_upgrades_with_its_groups(
    tmp_path: Path,
) -> None:
    path = tmp_path / "previous.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
        for statements in sqlite_schema.MIGRATIONS[:4]:
            for statement in statements:
                connection.execute(statement)
        connection.execute("PRAGMA user_version = 4")
        connection.execute(
            "INSERT INTO consumer_groups VALUES ('g', ?, 0, 0)",
            (settings_json(GroupSettings()),),
        )
        connection.execute("INSERT INTO consumer_group_checkpoints VALUES ('g', 0, 3)")
    await _check_upgraded(f"sqlite:///{path}")
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA user_version").fetchone() == (
            sqlite_schema.LATEST_VERSION,
        )


@pytest.mark.postgres
async def test_a_postgres_database_of_the_previous_schema_upgrades_with_its_groups(
    fresh_postgres_url: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(fresh_postgres_url, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
            " description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in postgres_schema.MIGRATIONS[:8]:
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (%s, 'old')",
                (migration.version,),
            )
        await conn.execute(
            "INSERT INTO consumer_groups VALUES ('g', %s, now(), 0)",
            (Jsonb(settings_fields(GroupSettings())),),
        )
        await conn.execute("INSERT INTO consumer_group_checkpoints VALUES ('g', 0, 3)")
    await _check_upgraded(fresh_postgres_url)
    async with await psycopg.AsyncConnection.connect(fresh_postgres_url) as conn:
        cursor = await conn.execute("SELECT max(version) FROM schema_migrations")
        assert await cursor.fetchone() == (postgres_schema.MIGRATIONS[-1].version,)


async def _check_upgraded(url: str) -> None:
    """The store at ``url``, of the schema before failed attempts were stored, opens
    with its group and keeps failed attempts from then on."""
    events = await open_store(url)
    store = await open_group_store(events)
    try:
        assert [g.name for g in await store.list_groups()] == ["g"]
        assert await store.load_checkpoints("g") == {0: 3}
        (group,) = await store.list_groups()
        await store.save_attempts(group, [_failed("e1", 1, 2)])
        assert await _attempts(store) == {"e1": 2}
    finally:
        await store.close()
        await events.close()


async def _restock(channel: grpc.aio.Channel, count: int, products: int = 3) -> list[str]:
    stub = inventory_grpc.InventoryCommandServiceStub(channel)
    ids = []
    for n in range(count):
        request = inventory_pb.RestockProductRequest(product_id=f"p{n % products}", quantity=1)
        ids += [r.event.event_id async for r in stub.RestockProduct(request)]
    return ids


@contextlib.asynccontextmanager
async def serving(
    open_events: Opener,
) -> AsyncIterator[tuple[grpc.aio.Channel, pb_grpc.ConsumerGroupServiceAsyncStub]]:
    """One run of a gateway on the store ``open_events`` opens (the same data each time,
    so that tests can restart it), with a channel and a consumer-group stub to it."""
    async with (
        group_gateway(await open_events()) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        yield channel, pb_grpc.ConsumerGroupServiceStub(channel)


async def test_after_a_restart_delivery_resumes_above_the_stored_checkpoint(
    open_events: Opener,
) -> None:
    async with serving(open_events) as (channel, stub):
        await stub.CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(name="g", settings=group_settings(partitions=1))
        )
        ids = await _restock(channel, 6)
        async with member(stub, "g") as consumer:
            received = await consumer.deliveries(3)  # one per stream p0, p1, p2
            assert [d.event.event_id for d in received] == ids[:3]
            await consumer.ack(ids[0], ids[2])
            await consumer.nack(ids[1], action=pb.NACK_ACTION_PARK, reason="poison")
            # ids[3] and ids[5] (p0, p2) at once, ids[4] once ids[1] is parked.
            rest = await consumer.deliveries(3)
            assert sorted(d.event.event_id for d in rest) == sorted(ids[3:])
        # The member left with them unsettled: a failed attempt each, counted before the
        # gateway stops.
        async with asyncio.timeout(10):
            while True:
                group = (await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))).group
                if not group.members:
                    break
                await asyncio.sleep(0.01)
    # ids[3..5] come again after the restart, nothing before them.
    async with serving(open_events) as (channel, stub):
        group = (await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))).group
        assert group.parked == 1
        assert group.checkpoint == 3
        async with member(stub, "g") as consumer:
            again = await consumer.deliveries(3)
            assert sorted(d.event.event_id for d in again) == sorted(ids[3:])
            assert {d.attempt for d in again} == {2}
            await consumer.ack(*ids[3:])
            replay = await stub.ReplayParked(pb.ReplayParkedRequest(name="g"))
            assert replay.replayed == 1
            assert (await consumer.delivery()).event.event_id == ids[1]
    # A replay interrupted by a restart is not lost: it is delivered again.
    async with serving(open_events) as (channel, stub), member(stub, "g") as consumer:
        replayed = await consumer.delivery()
        assert replayed.event.event_id == ids[1]
        await consumer.ack(ids[1])
        await asyncio.sleep(0.3)
        group = (await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))).group
        assert group.parked == 0
        assert group.checkpoint == group.head_position == 6


async def _until(
    stub: pb_grpc.ConsumerGroupServiceAsyncStub, check: Callable[[pb.ConsumerGroup], bool]
) -> None:
    """Wait until group "g", as GetConsumerGroup reports it, passes ``check``."""
    async with asyncio.timeout(10):
        while True:
            reply = await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))
            if check(reply.group):
                return
            await asyncio.sleep(0.05)


async def test_failed_attempts_go_on_after_a_restart_until_the_event_is_parked(
    open_events: Opener,
) -> None:
    async with serving(open_events) as (channel, stub):
        await stub.CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(
                name="g", settings=group_settings(partitions=1, max_deliveries=3)
            )
        )
        poison, after = await _restock(channel, 2, products=1)
        async with member(stub, "g") as consumer:
            delivery = await consumer.delivery()
            assert (delivery.event.event_id, delivery.attempt) == (poison, 1)
            await consumer.nack(poison, reason="failed")
            delivery = await consumer.delivery()
            assert (delivery.event.event_id, delivery.attempt) == (poison, 2)
        # The member's stream ended with the event unsettled: its second failure.
        await _until(stub, lambda group: not group.members)
    async with serving(open_events) as (channel, stub), member(stub, "g") as consumer:
        delivery = await consumer.delivery()
        assert (delivery.event.event_id, delivery.attempt) == (poison, 3)
        await consumer.nack(poison, reason="failed again")
        # Its 3rd delivery failed: parked, and its stream goes on.
        delivery = await consumer.delivery()
        assert (delivery.event.event_id, delivery.attempt) == (after, 1)
        await consumer.ack(after)
        await _until(stub, lambda group: group.parked == 1)


async def test_a_reason_with_a_nul_character_is_parked_with_it_replaced(
    open_events: Opener,
) -> None:
    # PostgreSQL's text cannot hold NUL: refused there, the park was lost and the group
    # stored nothing more.
    async with serving(open_events) as (channel, stub):
        await stub.CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(name="g", settings=group_settings(partitions=1))
        )
        ids = await _restock(channel, 2, products=1)
        async with member(stub, "g") as consumer:
            (first,) = await consumer.deliveries(1)
            await consumer.nack(first.event.event_id, action=pb.NACK_ACTION_PARK, reason="a\x00b")
            (second,) = await consumer.deliveries(1)
            await consumer.ack(second.event.event_id)
            async with asyncio.timeout(10):
                while True:
                    request = pb.GetConsumerGroupRequest(name="g")
                    group = (await stub.GetConsumerGroup(request)).group
                    if group.checkpoint == 2 and group.parked == 1:
                        break
                    await asyncio.sleep(0.05)
    events = await open_events()
    store = await open_group_store(events)
    try:
        assert await store.replay_parked("g", 10) == 1
        (parked,) = await store.replaying("g", 10)
    finally:
        await store.close()
        await events.close()
    assert (parked.event_id, parked.reason) == (ids[0], "a\ufffdb")
