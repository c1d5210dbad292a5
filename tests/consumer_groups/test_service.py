"""Consumer groups end to end over gRPC: the rules of docs/consumer-groups.md, one by one."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import itertools
import logging
import random
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc
from orders.v1 import (
    event_stream_service_pb2,
    event_stream_service_pb2_grpc,
    inventory_command_service_pb2,
    inventory_command_service_pb2_grpc,
    order_command_service_pb2_grpc,
)

from domain.ports import EventStore, RecordedEvent
from server.app import Gateway
from server.consumer_groups.engine import Entry, GroupTuning
from server.consumer_groups.leases import LiveMember, LocalMember
from server.consumer_groups.model import GroupRecord
from server.consumer_groups.store_postgres import PostgresLeases
from server.consumer_groups.stores import open_group_store
from server.stores.factory import open_store
from server.stores.memory import MemoryEventStore
from tests.clients import Clients, bad_fields, detail, item, order_request
from tests.conformance.contract import commit_of
from tests.group_support import QUICK, group_gateway, group_settings, join, member
from tests.group_support import Member as GroupMember
from tests.postgres_databases import new_database


@dataclass
class Env:
    gateway: Gateway
    groups: pb_grpc.ConsumerGroupServiceAsyncStub
    clients: Clients

    async def create(self, name: str = "g", **settings: Any) -> pb.ConsumerGroup:
        response = await self.groups.CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(name=name, settings=group_settings(**settings))
        )
        return response.group

    async def get(self, name: str = "g") -> pb.ConsumerGroup:
        return (await self.groups.GetConsumerGroup(pb.GetConsumerGroupRequest(name=name))).group

    async def restocks(self, count: int, products: int = 1) -> list[str]:
        ids = []
        for n in range(count):
            events = await self.clients.restock(f"p{n % products}", 1)
            ids.append(events[0].event_id)
        return ids


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with env_of() as env:
        yield env


@contextlib.asynccontextmanager
async def env_of(
    store: EventStore | None = None, tuning: GroupTuning = QUICK, **settings: Any
) -> AsyncIterator[Env]:
    """A gateway (``group_gateway``'s) and clients of it."""
    async with (
        group_gateway(store, tuning, **settings) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        yield Env(
            gateway,
            pb_grpc.ConsumerGroupServiceStub(channel),
            Clients(
                channel=channel,
                orders=order_command_service_pb2_grpc.OrderCommandServiceStub(channel),
                inventory=inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel),
                events=event_stream_service_pb2_grpc.EventStreamServiceStub(channel),
            ),
        )


def reason_of(error: grpc.aio.AioRpcError) -> str:
    info = detail(error, error_details_pb2.ErrorInfo)
    assert info.domain == "order-gateway"
    return str(info.reason)


async def settled(env: Env, name: str = "g", within: float = 10) -> pb.ConsumerGroup:
    """The group once its checkpoint reached the head (checkpoints are stored async)."""
    async with asyncio.timeout(within):
        while True:
            group = await env.get(name)
            if group.checkpoint == group.head_position and group.in_flight == 0:
                return group
            await asyncio.sleep(0.02)


# -- creating, reading, deleting ---------------------------------------------------------


async def test_a_group_reports_its_effective_settings(env: Env) -> None:
    group = await env.create("orders-projection")
    assert group.name == "orders-projection"
    assert group.settings.partitions == 16
    assert group.settings.ack_timeout.seconds == 30
    assert group.settings.max_deliveries == 5
    assert len(group.partition_states) == 16
    assert group.created_at.seconds > 0
    listed = await env.groups.ListConsumerGroups(pb.ListConsumerGroupsRequest())
    assert [g.name for g in listed.groups] == ["orders-projection"]


async def pages_of(env: Env, page_size: int, page_token: str = "") -> list[list[str]]:
    """The names on each page of ListConsumerGroups, following next_page_token."""
    pages = []
    while True:
        listed = await env.groups.ListConsumerGroups(
            pb.ListConsumerGroupsRequest(page_size=page_size, page_token=page_token)
        )
        pages.append([group.name for group in listed.groups])
        page_token = listed.next_page_token
        if not page_token:
            return pages


async def test_groups_are_listed_by_name_a_page_at_a_time(any_store: EventStore) -> None:
    # In code point order on every store: PostgreSQL's collation may put "a" before "B".
    async with env_of(any_store) as env:
        for name in ("b", "B", "a.2", "a", "A-1"):
            await env.create(name, partitions=1)
        every = ["A-1", "B", "a", "a.2", "b"]
        assert await pages_of(env, 0) == [every]
        assert await pages_of(env, 2) == [["A-1", "B"], ["a", "a.2"], ["b"]]
        assert await pages_of(env, 5) == [every]
        assert await pages_of(env, 1_000_000) == [every]
        # A page goes on after its token's group, even once that group is deleted.
        first = await env.groups.ListConsumerGroups(pb.ListConsumerGroupsRequest(page_size=2))
        await env.groups.DeleteConsumerGroup(pb.DeleteConsumerGroupRequest(name="B"))
        await env.create("Z", partitions=1)
        assert await pages_of(env, 2, first.next_page_token) == [["Z", "a"], ["a.2", "b"]]


@pytest.mark.postgres
async def test_groups_are_listed_in_code_point_order_whatever_the_collation(
    postgres_url: str,
) -> None:
    # ORDER BY name in a database whose collation is ICU's English: a A-1 a.2 b B.
    icu_english = "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en' LOCALE 'C.UTF-8'"
    with new_database(postgres_url, icu_english) as url:
        async with env_of(await open_store(url)) as env:
            for group in ("b", "B", "a.2", "a", "A-1"):
                await env.create(group, partitions=1)
            assert await pages_of(env, 0) == [["A-1", "B", "a", "a.2", "b"]]
            assert await pages_of(env, 2) == [["A-1", "B"], ["a", "a.2"], ["b"]]


async def test_a_page_larger_than_the_largest_is_the_largest(env: Env) -> None:
    for n in range(1_001):
        await env.create(f"g{n:04d}", partitions=1)
    pages = await pages_of(env, 5_000)
    assert [len(page) for page in pages] == [1_000, 1]


@pytest.mark.parametrize(
    ("page_size", "page_token", "fields"),
    [
        (-1, "", ["page_size"]),
        (0, "not a token", ["page_token"]),
        (2, base64.urlsafe_b64encode(b"after:no spaces").decode(), ["page_token"]),
        (2, base64.urlsafe_b64encode(b"g").decode(), ["page_token"]),
        (-5, "\u00e9", ["page_size", "page_token"]),
        (2, " " + base64.urlsafe_b64encode(b"after:g").decode(), ["page_token"]),
        (2, base64.urlsafe_b64encode(b"after:g").decode() + "==!", ["page_token"]),
    ],
    ids=["negative-size", "not-base64", "bad-name", "no-prefix", "both", "spaced", "trailing"],
)
async def test_a_bad_page_request_names_its_fields(
    env: Env, page_size: int, page_token: str, fields: list[str]
) -> None:
    await env.create("g")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await env.groups.ListConsumerGroups(
            pb.ListConsumerGroupsRequest(page_size=page_size, page_token=page_token)
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(refused.value) == fields


async def test_creating_again_with_equal_settings_answers_the_group(env: Env) -> None:
    first = await env.create("g", partitions=4, event_types=["OrderCreated"])
    again = await env.create("g", partitions=4, event_types=["OrderCreated"])
    assert again.created_at == first.created_at
    # Defaults spelt out are equal settings too.
    await env.create("g", partitions=4, event_types=["OrderCreated"], max_deliveries=5)


async def test_event_types_in_another_order_or_twice_are_equal_settings(env: Env) -> None:
    # A group takes the set of its types: how a client lists them changes nothing.
    first = await env.create("g", event_types=["OrderCreated", "OrderCancelled"])
    again = await env.create("g", event_types=["OrderCancelled", "OrderCreated", "OrderCreated"])
    assert again.created_at == first.created_at
    # Reported as that set: sorted, each once.
    for group in (first, again, await env.get()):
        assert list(group.settings.event_types) == ["OrderCancelled", "OrderCreated"]


async def test_a_position_beside_start_from_end_is_no_setting_of_the_group(env: Env) -> None:
    # start_from_end wins, so the position given with it starts nothing.
    group = await env.create("g", start_from_end=True, start_after_position=3)
    assert group.settings.start_from_end
    assert group.settings.start_after_position == 0
    again = await env.create("g", start_from_end=True)
    assert again.created_at == group.created_at


async def test_creating_again_with_other_settings_is_already_exists(env: Env) -> None:
    await env.create("g", partitions=4)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.create("g", partitions=8)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert reason_of(caught.value) == "CONSUMER_GROUP_EXISTS"


async def test_every_invalid_setting_is_named_at_once(env: Env) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.create(
            "bad name!",
            partitions=257,
            ack_timeout=0.5,
            max_deliveries=101,
            event_types=["OrderCreated", "NoSuchEvent"],
            start_after_position=2**63,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(bad_fields(caught.value)) == {
        "name",
        "settings.partitions",
        "settings.ack_timeout",
        "settings.max_deliveries",
        "settings.event_types[1]",
        "settings.start_after_position",
    }
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.create("g", ack_timeout=3601)
    assert bad_fields(caught.value) == ["settings.ack_timeout"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.create("x" * 65)
    assert bad_fields(caught.value) == ["name"]


@pytest.mark.parametrize(
    ("partitions", "ack_timeout", "max_deliveries", "max_in_flight"),
    [(256, 3600, 100, 1000), (1, 1, 1, 1)],
    ids=["highest", "lowest"],
)
async def test_each_end_of_a_setting_s_range_is_accepted(
    env: Env, partitions: int, ack_timeout: int, max_deliveries: int, max_in_flight: int
) -> None:
    # 1 to 256 partitions, 1 s to 1 h, 1 to 100 deliveries, 1 to 1,000 in flight: both
    # ends are in range, and the group reports them as given.
    group = await env.create(
        "g", partitions=partitions, ack_timeout=ack_timeout, max_deliveries=max_deliveries
    )
    assert group.settings.partitions == partitions
    assert (group.settings.ack_timeout.seconds, group.settings.ack_timeout.nanos) == (
        ack_timeout,
        0,
    )
    assert group.settings.max_deliveries == max_deliveries
    assert len(group.partition_states) == partitions
    async with member(env.groups, "g", max_in_flight=max_in_flight) as consumer:
        assert consumer.partitions == list(range(partitions))


@pytest.mark.parametrize(("seconds", "nanos"), [(2, 2_000_000_000), (5, -1), (-1, 500_000_000)])
async def test_an_ack_timeout_that_is_no_valid_duration_is_refused(
    env: Env, seconds: int, nanos: int
) -> None:
    # Each adds up to a timeout in range; none is a Duration protobuf allows.
    settings = group_settings()
    settings.ack_timeout.seconds, settings.ack_timeout.nanos = seconds, nanos
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.groups.CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(name="g", settings=settings)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == ["settings.ack_timeout"]


async def test_a_create_that_a_deletion_follows_at_once_answers_the_group(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deletion through another client lands between the create and its answer.
    groups = env.gateway.groups
    create_group = groups.store.create_group

    async def deleted_at_once(record: GroupRecord) -> GroupRecord:
        created = await create_group(record)
        await groups.store.delete_group(record.name)
        return created

    monkeypatch.setattr(groups.store, "create_group", deleted_at_once)
    group = await env.create("g", partitions=4)
    assert (group.name, group.settings.partitions) == ("g", 4)


@pytest.mark.parametrize("rpc", ["get", "delete", "replay", "consume"])
async def test_an_unknown_group_is_not_found(env: Env, rpc: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if rpc == "get":
            await env.get("nope")
        elif rpc == "delete":
            await env.groups.DeleteConsumerGroup(pb.DeleteConsumerGroupRequest(name="nope"))
        elif rpc == "replay":
            await env.groups.ReplayParked(pb.ReplayParkedRequest(name="nope"))
        else:
            await join(env.groups, "nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(caught.value) == "CONSUMER_GROUP_NOT_FOUND"


async def test_delete_removes_the_group_and_ends_its_members_with_not_found(env: Env) -> None:
    await env.create("g")
    async with member(env.groups, "g") as consumer:
        await env.groups.DeleteConsumerGroup(pb.DeleteConsumerGroupRequest(name="g"))
        error = await consumer.finished()
        assert error is not None and error.code() == grpc.StatusCode.NOT_FOUND
        assert reason_of(error) == "CONSUMER_GROUP_NOT_FOUND"
    listed = await env.groups.ListConsumerGroups(pb.ListConsumerGroupsRequest())
    assert list(listed.groups) == []
    # A new group of that name starts afresh.
    await env.restocks(1)
    await env.create("g", partitions=2)
    async with member(env.groups, "g") as consumer:
        assert (await consumer.delivery()).attempt == 1


async def test_a_deleted_group_lets_go_of_its_events_at_once(env: Env) -> None:
    # Its members' ended streams keep the group's runtime reachable through reference
    # cycles: its events stayed in memory until Python's cyclic collector ran (about 8 MB
    # a group created, read from the start of an 84,000-event log and deleted).
    await env.restocks(300, products=30)
    await env.create("g", partitions=2)
    async with member(env.groups, "g", max_in_flight=10) as consumer:
        await consumer.deliveries(10)
        gc.collect()
        gc.disable()
        try:
            await env.groups.DeleteConsumerGroup(pb.DeleteConsumerGroupRequest(name="g"))
            await consumer.finished()
            await asyncio.sleep(0.1)
            held = [o for o in gc.get_objects() if isinstance(o, Entry)]
        finally:
            gc.enable()
    assert held == []


async def test_an_ack_timeout_due_as_a_deleted_group_stops_is_no_error(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    # The group stops its tasks one by one; an ack timer due meanwhile failed a delivery
    # of a member already gone (KeyError in the timer's callback, logged by asyncio).
    await env.restocks(1)
    await env.create("g", ack_timeout=30)
    async with member(env.groups, "g") as consumer:
        await consumer.delivery()
        runtime = env.gateway.groups.runtimes["g"]
        (entry,) = [e for m in runtime.members.values() for e in m.in_flight.values()]
        assert entry.timer is not None
        entry.timer.cancel()
        loop = asyncio.get_running_loop()
        entry.timer = loop.call_later(0.05, runtime._timed_out, entry, entry.deliveries)
        runtime._tasks.append(asyncio.create_task(_slow_to_end(0.2)))
        await asyncio.sleep(0)
        caplog.set_level(logging.ERROR, logger="asyncio")
        await env.groups.DeleteConsumerGroup(pb.DeleteConsumerGroupRequest(name="g"))
        await consumer.finished()
    await asyncio.sleep(0.1)
    assert not [r for r in caplog.records if r.name == "asyncio"]


async def _slow_to_end(seconds: float) -> None:
    """A task that takes ``seconds`` to end once cancelled."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        await asyncio.sleep(seconds)
        raise


# -- joining -------------------------------------------------------------------------


async def test_the_first_message_must_be_a_join(env: Env) -> None:
    await env.create("g")
    call = env.groups.Consume()
    await call.write(pb.ConsumeRequest(ack=pb.Ack(event_ids=["x"])))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == ["join"]


async def test_a_message_after_the_join_that_does_not_parse_is_invalid_argument(
    env: Env,
) -> None:
    await env.create("g")
    call: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = env.clients.channel.stream_stream(
        "/orders.v1.ConsumerGroupService/Consume",
        request_serializer=None,
        response_deserializer=None,
    )
    join = pb.ConsumeRequest(join=pb.Join(group="g")).SerializeToString()
    consume = call(iter([join, b"\xff\xff\xff\xff\x0f"]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in consume:
            pass
    assert (caught.value.code(), caught.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "request message could not be parsed",
    )


async def test_a_consume_cancelled_before_its_join_is_cancelled_not_a_fault(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="order_gateway.access")
    call = env.groups.Consume()
    await asyncio.sleep(0.1)  # the server waits for the join
    call.cancel()
    await eventually(lambda: any("Consume" in r.getMessage() for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records if "Consume" in r.getMessage()]
    assert " CANCELLED " in lines[0], lines
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_join_fields_are_validated(env: Env) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await join(env.groups, "", member_id="has space", max_in_flight=1001)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(bad_fields(caught.value)) == {"join.group", "join.member_id", "join.max_in_flight"}


async def test_a_member_id_is_taken_while_its_member_is_connected(env: Env) -> None:
    await env.create("g")
    async with member(env.groups, "g", member_id="worker-1") as first:
        assert first.member_id == "worker-1"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await join(env.groups, "g", member_id="worker-1")
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert reason_of(caught.value) == "MEMBER_ID_TAKEN"
    async with member(env.groups, "g", member_id="worker-1") as again:
        assert again.member_id == "worker-1"


async def test_an_empty_member_id_gets_a_uuid(env: Env) -> None:
    await env.create("g")
    async with member(env.groups, "g") as consumer:
        uuid.UUID(consumer.member_id)


async def eventually(check: Callable[[], bool], within: float = 10) -> None:
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - grpc reader tasks change the state
            await asyncio.sleep(0.01)


async def test_assignments_follow_members_joining_and_leaving(env: Env) -> None:
    await env.create("g", partitions=5)
    async with member(env.groups, "g", member_id="a") as a:
        assert a.partitions == [0, 1, 2, 3, 4]
        async with member(env.groups, "g", member_id="b") as b:
            await eventually(lambda: sorted(a.partitions + b.partitions) == [0, 1, 2, 3, 4])
            assert {len(a.partitions), len(b.partitions)} == {2, 3}
            before = {"a": set(a.partitions), "b": set(b.partitions)}
            async with member(env.groups, "g", member_id="c") as c:
                await eventually(
                    lambda: sorted(a.partitions + b.partitions + c.partitions) == [0, 1, 2, 3, 4]
                )
                assert sorted(len(m.partitions) for m in (a, b, c)) == [1, 2, 2]
                # Fewest moves: a and b only gave up partitions, c got only those.
                assert set(a.partitions) <= before["a"] and set(b.partitions) <= before["b"]
                group = await env.get()
                owners = {p.partition: p.member_id for p in group.partition_states}
                assert owners == {p: m.member_id for m in (a, b, c) for p in m.partitions}
                assert sorted(m.member_id for m in group.members) == ["a", "b", "c"]
        await eventually(lambda: a.partitions == [0, 1, 2, 3, 4])
        group = await env.get()
        assert [m.member_id for m in group.members] == ["a"]
        assert list(group.members[0].partitions) == [0, 1, 2, 3, 4]


async def test_members_beyond_the_partition_count_stand_by_and_take_over(env: Env) -> None:
    await env.create("g", partitions=1)
    await env.restocks(2, products=2)
    async with (
        member(env.groups, "g", member_id="a") as a,
        member(env.groups, "g", member_id="b") as b,
    ):
        assert b.partitions == []
        held = await a.deliveries(2)
        await a.close()
        # a's unsettled deliveries go to the standby at once, as failed attempts.
        moved = await b.deliveries(2)
        assert b.partitions == [0]
        assert [d.event.event_id for d in moved] == [d.event.event_id for d in held]
        assert [d.attempt for d in moved] == [2, 2]


async def test_deliveries_carry_the_crc32_partition(env: Env) -> None:
    await env.create("g", partitions=7)
    await env.restocks(12, products=12)
    async with member(env.groups, "g") as consumer:
        for delivery in await consumer.deliveries(12):
            stream = delivery.event.stream_id.encode()
            assert delivery.partition == zlib.crc32(stream) % 7


# -- order and settling --------------------------------------------------------------


async def test_a_stream_s_next_event_waits_until_the_one_before_is_settled(env: Env) -> None:
    await env.create("g")
    first, second, third = await env.restocks(3)  # one stream: product-p0
    async with member(env.groups, "g") as consumer:
        delivery = await consumer.delivery()
        assert delivery.event.event_id == first
        await consumer.no_delivery(0.3)
        await consumer.ack(first)
        assert (await consumer.delivery()).event.event_id == second
        await consumer.nack(second, action=pb.NACK_ACTION_SKIP)
        assert (await consumer.delivery()).event.event_id == third


async def test_streams_do_not_wait_for_each_other(env: Env) -> None:
    await env.create("g", partitions=1)
    ids = await env.restocks(4, products=4)
    async with member(env.groups, "g") as consumer:
        received = await consumer.deliveries(4)
        assert sorted(d.event.event_id for d in received) == sorted(ids)


async def test_max_in_flight_bounds_unsettled_deliveries(env: Env) -> None:
    await env.create("g", partitions=1)
    await env.restocks(10, products=10)
    async with member(env.groups, "g", max_in_flight=3) as consumer:
        held = await consumer.deliveries(3)
        await consumer.no_delivery(0.3)
        await consumer.ack(held[0].event.event_id)
        await consumer.delivery()
        await consumer.no_delivery(0.2)


async def test_a_retried_event_comes_back_with_the_next_attempt(env: Env) -> None:
    await env.create("g")
    (event_id,) = await env.restocks(1)
    async with member(env.groups, "g") as consumer:
        await consumer.delivery()
        await consumer.nack(event_id, action=pb.NACK_ACTION_RETRY, reason="db down")
        again = await consumer.delivery()
        assert (again.event.event_id, again.attempt) == (event_id, 2)
        await consumer.nack(event_id)  # UNSPECIFIED retries too
        assert (await consumer.delivery()).attempt == 3


async def test_retry_backoff_is_one_second_at_first() -> None:
    async with (
        group_gateway(tuning=GroupTuning(flush_interval=0.05)) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        inventory = inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel)
        await stub.CreateConsumerGroup(pb.CreateConsumerGroupRequest(name="g"))
        request = inventory_command_service_pb2.RestockProductRequest(product_id="p", quantity=1)
        async for _ in inventory.RestockProduct(request):
            pass
        async with member(stub, "g") as consumer:
            first = await consumer.delivery()
            nacked_at = time.monotonic()
            await consumer.nack(first.event.event_id)
            again = await consumer.delivery(5)
            # Not sooner than 1 s (a lower bound: no flakiness on a slow machine).
            assert time.monotonic() - nacked_at >= 1.0
            assert again.attempt == 2


async def test_an_event_is_parked_after_max_deliveries_and_its_stream_moves_on(env: Env) -> None:
    await env.create("g", max_deliveries=2)
    first, second = await env.restocks(2)
    async with member(env.groups, "g") as consumer:
        for attempt in (1, 2):
            delivery = await consumer.delivery()
            assert (delivery.event.event_id, delivery.attempt) == (first, attempt)
            await consumer.nack(first, reason=f"failure {attempt}")
        assert (await consumer.delivery()).event.event_id == second
        await consumer.ack(second)
        group = await settled(env)
        assert group.parked == 1


async def test_park_and_skip_settle_at_once(env: Env) -> None:
    await env.create("g", partitions=1)
    parked, skipped = await env.restocks(2, products=2)
    async with member(env.groups, "g") as consumer:
        await consumer.deliveries(2)
        await consumer.nack(parked, action=pb.NACK_ACTION_PARK, reason="poison")
        await consumer.nack(skipped, action=pb.NACK_ACTION_SKIP)
        group = await settled(env)
        assert group.parked == 1
        await consumer.no_delivery(0.2)


async def test_a_parked_event_is_stored_at_once_not_with_the_next_checkpoints() -> None:
    # Checkpoints stored every 30 s: a park waited for them, neither counted by
    # GetConsumerGroup nor returned by ReplayParked meanwhile (0.5 s by default).
    async with env_of(tuning=GroupTuning(flush_interval=30, retry_base=0.02)) as env:
        await env.create("g", partitions=1, max_deliveries=1)
        poison, failing = await env.restocks(2, products=2)
        async with member(env.groups, "g") as consumer:
            await consumer.deliveries(2)
            await consumer.nack(poison, action=pb.NACK_ACTION_PARK, reason="poison")
            await consumer.nack(failing, action=pb.NACK_ACTION_RETRY)
            async with asyncio.timeout(2):
                while (await env.get()).parked < 2:  # noqa: ASYNC110 - polls the store
                    await asyncio.sleep(0.01)
            replay = await env.groups.ReplayParked(pb.ReplayParkedRequest(name="g"))
            assert replay.replayed == 2


async def test_replay_parked_is_bounded_and_starts_at_attempt_one(env: Env) -> None:
    await env.create("g", partitions=1)
    ids = await env.restocks(3, products=3)
    async with member(env.groups, "g") as consumer:
        for delivery in await consumer.deliveries(3):
            await consumer.nack(delivery.event.event_id, action=pb.NACK_ACTION_PARK)
        assert (await settled(env)).parked == 3
        replay = await env.groups.ReplayParked(pb.ReplayParkedRequest(name="g", limit=2))
        assert replay.replayed == 2
        replayed = await consumer.deliveries(2)
        assert [d.attempt for d in replayed] == [1, 1]
        # The longest-parked first: they were parked in this order.
        assert {d.event.event_id for d in replayed} <= set(ids)
        await consumer.no_delivery(0.2)
        assert (await env.get()).parked == 1
        await consumer.ack(*(d.event.event_id for d in replayed))
        rest = await env.groups.ReplayParked(pb.ReplayParkedRequest(name="g"))
        assert rest.replayed == 1
        last = await consumer.delivery()
        assert {last.event.event_id, *(d.event.event_id for d in replayed)} == set(ids)
        await consumer.ack(last.event.event_id)
        await asyncio.sleep(0.2)
        assert (await env.get()).parked == 0


async def test_a_large_replay_is_held_a_batch_at_a_time() -> None:
    tuning = GroupTuning(flush_interval=0.05, retry_base=0.02, replay_batch=2)
    async with (
        group_gateway(tuning=tuning) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        inventory = inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel)
        await stub.CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(name="g", settings=group_settings(partitions=1))
        )
        for n in range(5):
            request = inventory_command_service_pb2.RestockProductRequest(
                product_id=f"p{n}", quantity=1
            )
            async for _ in inventory.RestockProduct(request):
                pass
        async with member(stub, "g") as consumer:
            for delivery in await consumer.deliveries(5):
                await consumer.nack(delivery.event.event_id, action=pb.NACK_ACTION_PARK)
            get = pb.GetConsumerGroupRequest(name="g")
            async with asyncio.timeout(10):
                while (await stub.GetConsumerGroup(get)).group.parked < 5:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            replay = await stub.ReplayParked(pb.ReplayParkedRequest(name="g"))
            assert replay.replayed == 5
            runtime = gateway.groups.runtimes["g"]
            held = [await consumer.delivery(), await consumer.delivery()]
            await consumer.no_delivery(0.5)  # the other three wait in the store
            assert sum(len(p.replays) for p in runtime._partitions) == 2
            seen = {d.event.event_id for d in held}
            await consumer.ack(*seen)
            while len(seen) < 5:
                delivery = await consumer.delivery()
                assert delivery.attempt == 1
                seen.add(delivery.event.event_id)
                await consumer.ack(delivery.event.event_id)
                assert sum(len(p.replays) for p in runtime._partitions) <= 2


async def test_a_replayed_event_does_not_hold_back_its_stream(env: Env) -> None:
    await env.create("g")
    first, second, third = await env.restocks(3)
    async with member(env.groups, "g") as consumer:
        await consumer.delivery()
        await consumer.nack(first, action=pb.NACK_ACTION_PARK)
        assert (await consumer.delivery()).event.event_id == second
        await asyncio.sleep(0.2)
        await env.groups.ReplayParked(pb.ReplayParkedRequest(name="g"))
        replayed = await consumer.delivery()
        assert replayed.event.event_id == first
        await consumer.ack(second)
        # The replayed event is still in flight; the stream goes on regardless.
        assert (await consumer.delivery()).event.event_id == third


async def test_the_checkpoint_stays_below_a_replayed_event_until_it_is_settled(
    env: Env,
) -> None:
    await env.create("g", partitions=1)
    first, second = await env.restocks(2)
    async with member(env.groups, "g") as consumer:
        await consumer.delivery()
        await consumer.nack(first, action=pb.NACK_ACTION_PARK)
        assert (await consumer.delivery()).event.event_id == second
        await consumer.ack(second)
        assert (await settled(env)).parked == 1  # past the parked event
        await env.groups.ReplayParked(pb.ReplayParkedRequest(name="g"))
        replayed = await consumer.delivery()
        assert replayed.event.event_id == first
        group = await env.get()
        assert group.checkpoint == replayed.event.position - 1
        assert group.partition_states[0].checkpoint == replayed.event.position - 1
        await consumer.ack(first)
        assert (await settled(env)).checkpoint == group.head_position


async def park_behind_an_unsettled_event(env: Env) -> tuple[str, str]:
    """Two events on two streams of one partition: the second parked while the first is
    still in flight, then the member leaves (the group's last), so that the checkpoint
    stored stays below both. Returns (first, parked)."""
    await env.create("g", partitions=1)
    first, parked = await env.restocks(2, products=2)
    async with member(env.groups, "g") as consumer:
        await consumer.deliveries(2)
        await consumer.nack(parked, action=pb.NACK_ACTION_PARK, reason="poison")
        async with asyncio.timeout(10):
            while (await env.get()).parked < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    async with asyncio.timeout(10):
        while "g" in env.gateway.groups.runtimes:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return first, parked


async def test_a_parked_event_read_again_from_the_log_stays_parked(env: Env) -> None:
    # It was delivered as a new event at attempt 1, and its park stayed behind it.
    first, _ = await park_behind_an_unsettled_event(env)
    async with member(env.groups, "g") as consumer:
        again = await consumer.delivery()
        assert (again.event.event_id, again.attempt) == (first, 2)
        await consumer.ack(first)
        await consumer.no_delivery(0.3)
        group = await settled(env)
        assert group.parked == 1


async def test_a_parked_event_read_again_from_the_log_is_replayed_once(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    # It was held twice, as a replay and as read from the log: the second copy stayed in
    # flight for ever (its ack timer failed on a KeyError) and held the checkpoint.
    first, parked = await park_behind_an_unsettled_event(env)
    await env.groups.ReplayParked(pb.ReplayParkedRequest(name="g"))
    async with member(env.groups, "g") as consumer:
        delivered = await consumer.deliveries(2)
        assert sorted(d.event.event_id for d in delivered) == sorted([first, parked])
        await consumer.ack(first, parked)
        await consumer.no_delivery(0.3)
        group = await settled(env)
        assert (group.parked, group.in_flight) == (0, 0)
    assert "Traceback" not in caplog.text


async def test_an_unacked_delivery_times_out_and_comes_again_at_once(env: Env) -> None:
    await env.create("g", ack_timeout=1)
    (event_id,) = await env.restocks(1)
    async with member(env.groups, "g") as consumer:
        first = await consumer.delivery()
        again = await consumer.delivery(5)
        assert (again.event.event_id, again.attempt) == (event_id, 2)
        assert first.attempt == 1


async def test_extend_restarts_the_ack_timeout(env: Env) -> None:
    await env.create("g", ack_timeout=2)
    (event_id,) = await env.restocks(1)
    async with member(env.groups, "g") as consumer:
        await consumer.delivery()
        for _ in range(8):  # 4 s: well past the 2 s timeout, extended 4 times per timeout
            await asyncio.sleep(0.5)
            await consumer.extend(event_id)
        await consumer.no_delivery(0.3)
        again = await consumer.delivery(5)  # no more extends: it times out
        assert again.attempt == 2


async def test_a_departed_member_s_deliveries_go_to_the_others_at_once(env: Env) -> None:
    await env.create("g", partitions=2)
    async with member(env.groups, "g", member_id="stays") as stays:
        leaving = await join(env.groups, "g", member_id="leaves")
        await eventually(lambda: stays.partitions == [0])
        await env.restocks(8, products=8)  # streams in both partitions
        taken = [d.event.event_id for d in await leaving.deliveries(1)]
        await leaving.close()
        seen: dict[str, int] = {}
        async with asyncio.timeout(10):
            while taken[0] not in seen:
                delivery = await stays.delivery()
                seen[delivery.event.event_id] = delivery.attempt
                await stays.ack(delivery.event.event_id)
        assert seen[taken[0]] == 2


SLOW_RETRIES = GroupTuning(flush_interval=0.05, retry_base=10)
"""A nack's first retry 10 s later: what comes back well before then came without it."""


async def test_an_ack_timeout_redelivers_without_the_nack_backoff() -> None:
    # A timeout is no nack: the delivery comes again as soon as the timeout is over.
    async with env_of(tuning=SLOW_RETRIES) as env:
        await env.create("g", ack_timeout=1)
        (event_id,) = await env.restocks(1)
        async with member(env.groups, "g") as consumer:
            first = await consumer.delivery()
            delivered_at = time.monotonic()
            again = await consumer.delivery(30)
            waited = time.monotonic() - delivered_at
            assert (first.attempt, again.event.event_id, again.attempt) == (1, event_id, 2)
            assert waited < 5, f"came again after {waited:.1f} s: 1 s timeout, 10 s backoff"


async def test_a_departed_member_s_deliveries_come_again_without_the_nack_backoff() -> None:
    # A departure is no nack either: the standby gets the deliveries left unsettled at once.
    async with env_of(tuning=SLOW_RETRIES) as env:
        await env.create("g", partitions=1)
        (event_id,) = await env.restocks(1)
        leaving = await join(env.groups, "g", member_id="leaves")
        try:
            async with member(env.groups, "g", member_id="stays") as stays:
                assert (leaving.partitions, stays.partitions) == ([0], [])
                assert (await leaving.delivery()).event.event_id == event_id
                await leaving.close()
                left_at = time.monotonic()
                again = await stays.delivery(30)
                waited = time.monotonic() - left_at
                assert (again.event.event_id, again.attempt) == (event_id, 2)
                assert waited < 4, f"came again after {waited:.1f} s: 10 s is the backoff"
        finally:
            await leaving.close()


async def test_a_partition_moved_to_a_joining_member_is_no_failed_attempt(env: Env) -> None:
    # The member that gives the partition up is still connected: its deliveries go to the
    # new owner with their attempt, and max_deliveries counts only the failures after.
    await env.create("g", partitions=2, max_deliveries=2)
    await env.restocks(8, products=8)  # streams in both partitions
    async with member(env.groups, "g", member_id="first") as first:
        held = await first.deliveries(8)
        async with member(env.groups, "g", member_id="second") as second:
            await eventually(lambda: len(first.partitions) == len(second.partitions) == 1)
            moving = sorted(d.event.event_id for d in held if d.partition in second.partitions)
            assert 0 < len(moving) < len(held)
            moved = await second.deliveries(len(moving))
            assert sorted(d.event.event_id for d in moved) == moving
            assert [d.attempt for d in moved] == [1] * len(moving)
            # Its first failure: delivered again, not parked; its second parks it.
            event_id = moved[0].event.event_id
            await second.nack(event_id)
            again = await second.delivery()
            assert (again.event.event_id, again.attempt) == (event_id, 2)
            await second.nack(event_id)
            # The others by id: the first delivered need not be the first by id (a move's
            # redeliveries come in no promised order, and ids of one millisecond do not
            # sort by time).
            await second.ack(*(moved_id for moved_id in moving if moved_id != event_id))
            await first.ack(*(d.event.event_id for d in held if d.event.event_id not in moving))
            assert (await settled(env)).parked == 1


async def test_a_lone_member_that_dies_on_an_event_counts_attempts_until_it_is_parked(
    env: Env,
) -> None:
    # A consumer that crashes on one event leaves the group without members each time:
    # its departures still count, so the event is parked instead of delivered forever.
    await env.create("g", partitions=1, max_deliveries=2)
    poison, after = await env.restocks(2)
    for attempt in (1, 2):
        crashing = await join(env.groups, "g")
        delivery = await crashing.delivery()
        assert (delivery.event.event_id, delivery.attempt) == (poison, attempt)
        await crashing.close()
        await eventually(lambda: env.gateway.groups.runtimes.get("g") is None)
    async with member(env.groups, "g") as consumer:
        delivery = await consumer.delivery()
        assert delivery.event.event_id == after
        await consumer.ack(after)
        assert (await settled(env)).parked == 1


async def test_a_departure_is_stored_even_when_its_call_is_cancelled_meanwhile(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client that disconnects can have its call's handler cancelled again while the
    # departure of the group's last member is being stored: the departure still completes.
    await env.create("g", partitions=1, max_deliveries=1)
    poison, after = await env.restocks(2)
    crashing = await join(env.groups, "g")
    assert (await crashing.delivery()).event.event_id == poison
    groups = env.gateway.groups
    runtime = groups.runtimes["g"]
    (departing,) = runtime.members.values()
    park, storing, go_on = groups.store.park, asyncio.Event(), asyncio.Event()

    async def park_once_stopped(group: GroupRecord, events: Any) -> None:
        if group.name not in groups.runtimes:  # the runtime is being stopped and stored
            storing.set()
            await go_on.wait()
        await park(group, events)

    monkeypatch.setattr(groups.store, "park", park_once_stopped)
    leaving = asyncio.create_task(groups.leave(runtime, departing))
    await storing.wait()
    leaving.cancel()
    go_on.set()
    with contextlib.suppress(asyncio.CancelledError):
        await leaving
    await crashing.close()
    async with member(env.groups, "g") as consumer:
        assert (await consumer.delivery()).event.event_id == after
        assert (await env.get()).parked == 1


async def test_the_checkpoint_never_passes_an_unsettled_event(env: Env) -> None:
    await env.create("g", partitions=1)
    held, *others = await env.restocks(6, products=6)
    async with member(env.groups, "g") as consumer:
        received = {d.event.event_id: d.event.position for d in await consumer.deliveries(6)}
        await consumer.ack(*others)
        await asyncio.sleep(0.3)
        group = await env.get()
        assert group.checkpoint == received[held] - 1
        assert group.partition_states[0].checkpoint == received[held] - 1
        assert group.in_flight == 1
        await consumer.ack(held)
        assert (await settled(env)).checkpoint == group.head_position


async def test_a_moved_checkpoint_is_stored_within_a_second_by_default() -> None:
    # With production's timings (no test's quick ones), and the member still connected:
    # what a crash now would resume from.
    async with env_of(tuning=GroupTuning()) as env:
        await env.create("g", partitions=1)
        (event_id,) = await env.restocks(1)
        store = env.gateway.groups.store
        async with member(env.groups, "g") as consumer:
            delivery = await consumer.delivery()
            await consumer.ack(event_id)
            acked_at = time.monotonic()
            moved = {0: delivery.event.position}
            async with asyncio.timeout(30):
                while await store.load_checkpoints("g") != moved:  # noqa: ASYNC110 - flushed
                    await asyncio.sleep(0.02)
            waited = time.monotonic() - acked_at
            assert waited < 2.5, f"stored {waited:.1f} s after the ack"


async def test_with_no_member_events_the_group_does_not_take_are_behind_its_checkpoints(
    env: Env,
) -> None:
    await env.restocks(4, products=4)
    await env.create("g", partitions=2, event_types=["OrderCreated"])
    group = await env.get()
    assert group.head_position == 4
    assert group.checkpoint == 4
    assert [p.checkpoint for p in group.partition_states] == [4, 4]

    created = await env.clients.create(order_request(item("p0")))
    order_created = next(e for e in created if e.event_type == "OrderCreated")
    taking = zlib.crc32(order_created.stream_id.encode()) % 2
    group = await env.get()
    assert group.head_position == 6
    expected = [6, 6]
    expected[taking] = order_created.position - 1
    assert [p.checkpoint for p in group.partition_states] == expected
    assert group.checkpoint == order_created.position - 1


async def test_the_reading_past_idle_checkpoints_is_bounded_and_goes_on_where_it_stopped(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await env.create("g", partitions=1, event_types=["OrderCreated"])
    await env.restocks(5, products=5)
    monkeypatch.setattr("server.consumer_groups.service.SCAN_PAGE", 1)
    monkeypatch.setattr("server.consumer_groups.service.SCAN_EVENTS", 3)
    group = await env.get()
    assert group.head_position == 5
    assert group.checkpoint == 3
    # The stored checkpoint is where it was: the next call reads on from 3, not from it.
    assert (await env.get()).checkpoint == 5


class CountingStore(MemoryEventStore):
    """Counts the events read with ``read_all``."""

    read = 0

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        events = await super().read_all(after_position, limit)
        self.read += len(events)
        return events


async def test_a_reading_of_many_groups_far_behind_reads_a_bounded_share_of_the_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 20 groups, each started at a position of its own, behind 1,000 events of other
    # types. Every ListConsumerGroups call (and every metrics reading) reads at most
    # SCAN_EVENTS of the log for all of them, and the next call goes on: within
    # about the calls one group would need, every group reports no lag.
    monkeypatch.setattr("server.consumer_groups.service.SCAN_PAGE", 10)
    monkeypatch.setattr("server.consumer_groups.service.SCAN_EVENTS", 100)
    events = CountingStore()
    async with env_of(events) as env:
        await append_others(events, 1_000)
        for n in range(20):
            await env.create(f"g{n}", event_types=["OrderCreated"], start_after_position=n * 7)
        for call in range(1, 20):
            events.read = 0
            listed = await env.groups.ListConsumerGroups(pb.ListConsumerGroupsRequest())
            assert events.read <= 100, f"call {call} read {events.read} events"
            if all(g.checkpoint == g.head_position for g in listed.groups):
                break
        assert call <= 11, f"{call} calls to catch up"
        await eventually(
            lambda: scraped(env.gateway, "order_gateway_consumer_group_lag_events", "g19") == 0
        )


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> EventStore:
    """An event store of each kind (the gateway given it closes it)."""
    if request.param == "memory":
        return MemoryEventStore()
    if request.param == "sqlite":
        return await open_store(f"sqlite:///{tmp_path / 'events.db'}")
    return await open_store(request.getfixturevalue("fresh_postgres_url"))


async def append_others(events: EventStore, count: int) -> None:
    """``count`` events of a type no test group takes, on streams of their own."""
    for first in range(0, count, 100):
        await events.append(commit_of([(f"other-{n}", 1) for n in range(first, first + 100)]))


@dataclass
class Watcher:
    """A user polling GetConsumerGroup as fast as it answers: every answer's group and
    partition checkpoints."""

    env: Env
    seen: list[tuple[int, ...]]

    async def watch(self) -> None:
        while True:
            group = await self.env.get()
            self.seen.append((group.checkpoint, *(p.checkpoint for p in group.partition_states)))

    def assert_never_back(self) -> None:
        for before, after in itertools.pairwise(self.seen):
            went_back = [n for n, (a, b) in enumerate(zip(before, after, strict=True)) if b < a]
            assert not went_back, f"checkpoints went back from {before} to {after}"


async def test_a_checkpoint_never_goes_back_when_its_partition_gets_a_member(
    any_store: EventStore,
) -> None:
    # Nobody consumes the group at first, and its checkpoints are reported past the
    # events it does not take. Then an event it takes arrives, and a member joins to
    # take it and ack it: its partition is delivered from then on (on PostgreSQL, under
    # a lease). Watched all along, no checkpoint moves back.
    async with env_of(any_store) as env:
        await env.create("g", partitions=2, event_types=["OrderCreated"])
        await env.restocks(1)
        await append_others(any_store, 5_000)
        watcher = Watcher(env, [])
        watching = asyncio.create_task(watcher.watch())
        try:
            await eventually(lambda: bool(watcher.seen) and watcher.seen[-1][0] == 5_001)
            await env.clients.create(order_request(item("p0")))
            async with member(env.groups, "g") as consumer:
                delivery = await consumer.delivery()
                await consumer.ack(delivery.event.event_id)
                await settled(env)
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
    watcher.assert_never_back()


async def test_a_checkpoint_never_goes_back_when_its_last_member_leaves(
    any_store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The member acks everything, and the gateway reports the partition's checkpoint at
    # the head before storing it (it stores at most every flush interval). Then the
    # member leaves, and the checkpoint is stored as the group stops here, slowly: watched
    # meanwhile, the checkpoint stays where it was reported.
    tuning = replace(QUICK, flush_interval=3600)
    async with env_of(any_store, tuning) as env:
        await env.create("g", partitions=1)
        await env.restocks(3)
        groups = env.gateway.groups
        save_checkpoints = groups.store.save_checkpoints

        async def slowly(group: GroupRecord, checkpoints: Mapping[int, int]) -> None:
            await asyncio.sleep(0.5)
            await save_checkpoints(group, checkpoints)

        monkeypatch.setattr(groups.store, "save_checkpoints", slowly)
        consumer = await join(env.groups, "g")
        for _ in range(3):  # one stream: each comes once the one before is acked
            await consumer.ack((await consumer.delivery()).event.event_id)
        await settled(env)
        watcher = Watcher(env, [])
        watching = asyncio.create_task(watcher.watch())
        try:
            await eventually(lambda: bool(watcher.seen))
            await consumer.close()
            await eventually(lambda: not groups.runtimes)
            await asyncio.sleep(0.8)  # the checkpoint stored meanwhile
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
        assert (await env.get()).checkpoint == 3
    watcher.assert_never_back()


class HeldWrites:
    """A store's checkpoint writes, each held until the test lets it through: a slow
    database, whose writes end when the test says."""

    def __init__(self, save: Callable[[GroupRecord, Mapping[int, int]], Any]) -> None:
        self._save = save
        self._held: asyncio.Queue[asyncio.Event] = asyncio.Queue()
        self._let: list[asyncio.Event] = []
        self._open = False

    async def save_checkpoints(self, group: GroupRecord, checkpoints: Mapping[int, int]) -> None:
        if not self._open:
            go = asyncio.Event()
            self._let.append(go)
            self._held.put_nowait(go)
            await go.wait()
        await self._save(group, checkpoints)

    async def next(self, within: float = 20) -> asyncio.Event:
        """The next write to be held; setting the event lets it through."""
        async with asyncio.timeout(within):
            return await self._held.get()

    def open(self) -> None:
        """Let every write through, held or to come."""
        self._open = True
        for go in self._let:
            go.set()


async def ack_all(consumer: GroupMember, acked: list[str]) -> None:
    """Ack every delivery as it comes, noting its event id."""
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        while True:
            delivery = await consumer.delivery(3600)
            await consumer.ack(delivery.event.event_id)
            acked.append(delivery.event.event_id)


@pytest.mark.postgres
async def test_a_checkpoint_never_goes_back_when_one_member_leaves_and_another_stays(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On PostgreSQL the leases say who delivers which partition. Two members on one
    # gateway, a partition each, ack their events, and the gateway reports the
    # checkpoints at the head before storing them (it stores at most every flush
    # interval). Then one member leaves while the other stays, and the checkpoints are
    # stored slowly: watched meanwhile, they stay where they were reported, and the
    # member that left is no longer named, although the leases name it until the next
    # lease round.
    tuning = replace(QUICK, flush_interval=3600)
    async with env_of(await open_store(fresh_postgres_url), tuning) as env:
        await env.create("g", partitions=2)
        stays = await join(env.groups, "g", member_id="stays")
        leaves = await join(env.groups, "g", member_id="leaves")
        acked: dict[str, list[str]] = {"stays": [], "leaves": []}
        acking = [
            asyncio.create_task(ack_all(stays, acked["stays"])),
            asyncio.create_task(ack_all(leaves, acked["leaves"])),
        ]
        writes = HeldWrites(env.gateway.groups.store.save_checkpoints)
        watcher = Watcher(env, [])
        watching = asyncio.create_task(watcher.watch())
        try:
            await eventually(lambda: (stays.partitions, leaves.partitions) == ([0], [1]), 15)
            await env.restocks(12, products=12)
            await settled(env)
            assert acked["leaves"], "the member that leaves acked nothing"
            monkeypatch.setattr(
                env.gateway.groups.store, "save_checkpoints", writes.save_checkpoints
            )
            await leaves.close()
            await writes.next()  # the departure's write of the checkpoints, held
            await asyncio.sleep(0.5)  # readings while it is held
            during = await env.get()
            writes.open()
            await eventually(lambda: stays.partitions == [0, 1], 15)
            await settled(env)
        finally:
            writes.open()
            for task in (*acking, watching):
                task.cancel()
            await asyncio.gather(*acking, watching, return_exceptions=True)
            await stays.close()
    watcher.assert_never_back()
    assert [m.member_id for m in during.members] == ["stays"]
    assert "leaves" not in {p.member_id for p in during.partition_states}


@pytest.mark.postgres
async def test_a_departed_member_s_partition_passes_to_the_member_that_stays_with_its_lease(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On PostgreSQL, two members on one gateway, a partition each; the one with partition 1
    # leaves with a delivery unsettled. The partition passes to the member that stays:
    # its lease is never let go (meanwhile free for any other replica to claim), and the
    # delivery comes again to the member that stays.
    released: list[list[int]] = []
    lease_round = PostgresLeases.round

    async def recording_round(
        self: PostgresLeases,
        group: str,
        replica_id: str,
        members: Sequence[LocalMember],
        release: Sequence[int],
        *args: Any,
    ) -> tuple[list[LiveMember], dict[int, str], set[int]]:
        if release:
            released.append(list(release))
        return await lease_round(self, group, replica_id, members, release, *args)

    monkeypatch.setattr(PostgresLeases, "round", recording_round)
    async with env_of(await open_store(fresh_postgres_url)) as env:
        await env.create("g", partitions=2)
        stays = await join(env.groups, "g", member_id="stays")
        leaves = await join(env.groups, "g", member_id="leaves")
        try:
            await eventually(lambda: (stays.partitions, leaves.partitions) == ([0], [1]), 15)
            product = next(n for n in range(100) if zlib.crc32(f"product-p{n}".encode()) % 2)
            await env.clients.restock(f"p{product}", 1)
            unsettled = await leaves.delivery()
            await leaves.close()
            await eventually(lambda: stays.partitions == [0, 1], 15)
            again = await stays.delivery()
        finally:
            await leaves.close()
            await stays.close()
    assert again.event.event_id == unsettled.event.event_id
    assert released == [], "the departed member's partition was let go before it passed"


@pytest.mark.postgres
async def test_a_checkpoint_never_goes_back_when_its_partition_moves_to_another_replica(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two gateways on one PostgreSQL database. The member on the first delivers both
    # partitions; a member joins through the second, and the first gives partition 1 up
    # to it: it stores the checkpoints that moved, then the one it reached, and only
    # then lets the lease go. The member acks the partition's last event while the first
    # write is under way. Watched through the first gateway, the partition's checkpoint
    # stays where it was reported while the second write is under way.
    tuning = replace(QUICK, flush_interval=3600)
    async with (
        env_of(await open_store(fresh_postgres_url), tuning) as here,
        env_of(await open_store(fresh_postgres_url), tuning) as there,
    ):
        await here.create("g", partitions=2)
        first = await join(here.groups, "g", member_id="first")
        products = [n for n in range(100) if zlib.crc32(f"product-p{n}".encode()) % 2 == 1][:2]
        for product in products:  # two streams of partition 1, delivered at once
            await here.clients.restock(f"p{product}", 1)
        earlier, last = await first.deliveries(2)
        assert (earlier.partition, last.partition) == (1, 1)
        writes = HeldWrites(here.gateway.groups.store.save_checkpoints)
        monkeypatch.setattr(here.gateway.groups.store, "save_checkpoints", writes.save_checkpoints)
        watcher = Watcher(here, [])
        watching = asyncio.create_task(watcher.watch())
        try:
            await first.ack(earlier.event.event_id)
            await eventually(
                lambda: bool(watcher.seen) and watcher.seen[-1][2] == earlier.event.position
            )
            second = await join(there.groups, "g", member_id="second")
            moved = await writes.next()  # the checkpoints that moved, before the give-up
            await first.ack(last.event.event_id)
            await eventually(lambda: watcher.seen[-1][2] == last.event.position)
            moved.set()
            await writes.next()  # the checkpoint reached, stored before the lease goes
            await asyncio.sleep(0.5)  # readings while it is held
            writes.open()
            await eventually(lambda: second.partitions == [1], 20)
            await settled(here)
            await second.close()
        finally:
            writes.open()
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            await first.close()
    watcher.assert_never_back()


@pytest.mark.parametrize("members", [2, 3])
async def test_order_holds_with_competing_members_nacking_at_random(env: Env, members: int) -> None:
    await env.create("g", partitions=4, max_deliveries=100)
    await env.clients.restock("a", 10_000)
    await env.clients.restock("b", 10_000)
    orders = []
    for n in range(15):
        events = await env.clients.create(order_request(item("a"), item("b")))
        orders.append(events[0].order_created.order_id)
        if n % 2:
            await env.clients.cancel(orders[-1])
    head = (await env.get()).head_position
    log: list[tuple[str, str, int]] = []  # (what, stream, version), in the order it happened
    done: set[str] = set()
    rng = random.Random(members)

    async def work(consumer: GroupMember) -> None:
        while True:
            delivery = await consumer.delivery(30)
            event = delivery.event
            log.append(("delivered", event.stream_id, event.stream_version))
            await asyncio.sleep(rng.random() * 0.005)
            if rng.random() < 0.3:
                await consumer.nack(event.event_id)
            else:
                log.append(("settled", event.stream_id, event.stream_version))
                done.add(event.event_id)
                await consumer.ack(event.event_id)

    joined = [await join(env.groups, "g", max_in_flight=5) for _ in range(members)]
    workers = [asyncio.create_task(work(m)) for m in joined]
    try:
        async with asyncio.timeout(60):
            while len(done) < head:  # noqa: ASYNC110 - the workers fill it
                await asyncio.sleep(0.05)
    finally:
        for task in workers:
            task.cancel()
        for consumer in joined:
            await consumer.close()
    settled_versions: dict[str, int] = {}
    for what, stream, version in log:
        if what == "delivered":
            # Delivered only once every earlier event of its stream was settled (an
            # event settled already may come again: an ack that crossed a rebalance).
            assert settled_versions.get(stream, 0) >= version - 1, (stream, version)
        else:
            settled_versions[stream] = max(settled_versions.get(stream, 0), version)
    assert len(done) == head


async def test_members_joining_and_leaving_under_load_lose_nothing_and_keep_order(
    env: Env,
) -> None:
    await env.create("g", partitions=8)
    await env.clients.restock("a", 10_000)
    log: list[tuple[str, str, int]] = []
    acked: set[str] = set()

    async def work(consumer: GroupMember) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            while True:
                event = (await consumer.delivery(60)).event
                log.append(("delivered", event.stream_id, event.stream_version))
                await asyncio.sleep(0.002)
                log.append(("settled", event.stream_id, event.stream_version))
                acked.add(event.event_id)
                await consumer.ack(event.event_id)

    async def write() -> set[str]:
        written: set[str] = set()
        for n in range(40):
            events = await env.clients.create(order_request(item("a")))
            written |= {e.event_id for e in events}
            if n % 3 == 0:
                cancelled = await env.clients.cancel(events[0].order_created.order_id)
                written |= {e.event_id for e in cancelled}
            await asyncio.sleep(0.01)
        return written

    writing = asyncio.create_task(write())
    members: list[GroupMember] = []
    workers: list[asyncio.Task[None]] = []
    try:
        for step in range(6):  # join, join, join, leave, join, leave: under the writes
            if step in (3, 5):
                await members.pop(0).close()
            else:
                members.append(await join(env.groups, "g", max_in_flight=3))
                workers.append(asyncio.create_task(work(members[-1])))
            await asyncio.sleep(0.15)
        written = await writing
        async with asyncio.timeout(60):
            while not written <= acked:  # noqa: ASYNC110 - the workers fill it
                await asyncio.sleep(0.05)
    finally:
        for task in workers:
            task.cancel()
        for consumer in members:
            await consumer.close()
    settled_versions: dict[str, int] = {}
    for what, stream, version in log:
        if what == "delivered":
            assert settled_versions.get(stream, 0) >= version - 1, (stream, version)
        else:
            settled_versions[stream] = max(settled_versions.get(stream, 0), version)


# -- bad input, limits and shutdown --------------------------------------------------


async def test_unknown_and_malformed_ids_are_ignored(env: Env) -> None:
    await env.create("g")
    (event_id,) = await env.restocks(1)
    async with member(env.groups, "g") as consumer:
        await consumer.delivery()
        await consumer.ack("no-such-id", "", "\x00" * 300, str(uuid.uuid4()))
        await consumer.nack("x" * 10_000, action=pb.NACK_ACTION_PARK)
        await consumer.extend("nope")
        await consumer.send(pb.ConsumeRequest())  # nothing set
        await consumer.nack(event_id, action=77)  # an action this server does not know
        again = await consumer.delivery()
        assert again.attempt == 2
        await consumer.ack(event_id)
        await settled(env)


async def test_a_second_join_ends_the_stream_with_invalid_argument(env: Env) -> None:
    await env.create("g")
    async with member(env.groups, "g") as consumer:
        await consumer.send(pb.ConsumeRequest(join=pb.Join(group="g")))
        error = await consumer.finished()
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_member_that_never_reads_holds_bounded_memory(env: Env) -> None:
    await env.create("g", partitions=1, ack_timeout=1, max_deliveries=3)
    await env.restocks(40, products=40)
    call = env.groups.Consume()
    await call.write(pb.ConsumeRequest(join=pb.Join(group="g", member_id="mute", max_in_flight=4)))
    runtime = env.gateway.groups.runtimes
    async with asyncio.timeout(10):
        while "g" not in runtime or "mute" not in runtime["g"].members:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    engine_member = runtime["g"].members["mute"]
    longest = 0
    # Its deliveries time out, come again and, after max_deliveries, are parked.
    async with asyncio.timeout(60):
        while (await env.get()).parked < 8:
            longest = max(longest, len(engine_member._outbox))
            assert len(engine_member.in_flight) <= 4
            await asyncio.sleep(0.05)
    assert longest <= 2 * 4 + 16 + 1
    call.cancel()


async def test_shutdown_ends_consume_with_unavailable() -> None:
    async with (
        group_gateway() as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        await stub.CreateConsumerGroup(pb.CreateConsumerGroupRequest(name="g"))
        consumer = await join(stub, "g")
        started = time.monotonic()
        await gateway.stop()
        error = await consumer.finished()
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < gateway.shutdown_grace + 5


async def test_a_stop_stores_the_checkpoints_and_ends_consume_at_once(tmp_path: Path) -> None:
    # Flushed once an hour, the checkpoint is stored by the stop itself. The stop ends
    # the stream at once, not once the grace runs out, and as the gateway's doing: the
    # member did not leave, so the delivery it held is no failed attempt.
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    tuning = GroupTuning(flush_interval=3600, retry_base=0.02)
    async with env_of(await open_store(url), tuning, shutdown_grace=5) as env:
        await env.create("g", partitions=1)
        first, second = await env.restocks(2)  # one stream: the second waits for the first
        consumer = await join(env.groups, "g")
        try:
            acked = await consumer.delivery()
            assert acked.event.event_id == first
            await consumer.ack(first)
            assert (await consumer.delivery()).event.event_id == second  # the ack is in
            started = time.monotonic()
            await env.gateway.stop()
            stopped_in = time.monotonic() - started
            error = await consumer.finished()
        finally:
            await consumer.close()
    assert stopped_in < 2.5, f"the stop took {stopped_in:.1f} s of its 5 s grace"
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
    events = await open_store(url)
    store = await open_group_store(events)
    try:
        assert await store.load_checkpoints("g") == {0: acked.event.position}
        # The second, in flight as the gateway stopped, failed no attempt: it comes
        # again with the same one.
        assert await store.load_attempts("g", [0]) == []
    finally:
        await store.close()
        await events.close()


# -- metrics -----------------------------------------------------------------------------


def scraped(gateway: Gateway, name: str, group: str = "g") -> float | None:
    value = gateway.metrics.registry.get_sample_value(name, {"group": group})
    return value


def gauges(gateway: Gateway, group: str = "g") -> tuple[float | None, ...]:
    """The group's members, in_flight, parked and lag_events gauges, as scraped."""
    return tuple(
        scraped(gateway, f"order_gateway_consumer_group_{name}", group)
        for name in ("members", "in_flight", "parked", "lag_events")
    )


async def test_metrics_per_group(env: Env) -> None:
    await env.create("g", partitions=1, max_deliveries=5)
    first, second, third = await env.restocks(3, products=3)
    async with member(env.groups, "g", max_in_flight=2) as consumer:
        await consumer.deliveries(2)
        await eventually(
            lambda: scraped(env.gateway, "order_gateway_consumer_group_in_flight") == 2
        )
        assert scraped(env.gateway, "order_gateway_consumer_group_members") == 1
        assert scraped(env.gateway, "order_gateway_consumer_group_lag_events") == 3
        await consumer.nack(first)
        await consumer.nack(second, action=pb.NACK_ACTION_PARK)
        await consumer.deliveries(2)  # first again, and third
        assert scraped(env.gateway, "order_gateway_consumer_group_redeliveries_total") == 1
        await consumer.ack(first, third)
        await eventually(
            lambda: (
                scraped(env.gateway, "order_gateway_consumer_group_parked") == 1
                and scraped(env.gateway, "order_gateway_consumer_group_lag_events") == 0
            )
        )
    # The last member gone, the group keeps its gauges, read from the store: an alert on
    # parked events must not go quiet because every consumer is down.
    await eventually(lambda: gauges(env.gateway) == (0, 0, 1, 0))
    assert scraped(env.gateway, "order_gateway_consumer_group_redeliveries_total") == 1
    # Deleted, the group leaves no series behind (each deleted group's stayed for good).
    await env.groups.DeleteConsumerGroup(pb.DeleteConsumerGroupRequest(name="g"))
    assert scraped(env.gateway, "order_gateway_consumer_group_redeliveries_total") is None
    await eventually(lambda: scraped(env.gateway, "order_gateway_consumer_group_parked") is None)


async def test_the_lag_of_a_group_whose_reader_falls_behind_keeps_counting() -> None:
    # A group created on a backlog, and a member that holds its delivery unsettled: the
    # group's reader stops at its window of unsettled events, far behind the log, and
    # nothing else here follows the log live. The lag gauge must still count every event
    # waiting, as GetConsumerGroup does (the alert on it is for exactly this).
    async with env_of(tuning=replace(QUICK, window=10)) as env:
        await env.restocks(60, products=6)
        await env.create("g", partitions=1)
        async with member(env.groups, "g", max_in_flight=1) as consumer:
            await consumer.delivery()
            group = await env.get()
            assert (group.checkpoint, group.head_position) == (0, 60)
            await eventually(lambda: gauges(env.gateway)[3] == 60)


async def test_metrics_of_a_group_nobody_consumes_come_from_the_store(env: Env) -> None:
    await env.create("g", partitions=2, event_types=["OrderCreated"])
    await env.restocks(1)  # not a type the group takes
    await env.clients.create(order_request(item("p0")))  # OrderCreated, then another type
    # From the stored checkpoints, moved past the events the group does not take (the
    # restock): the OrderCreated and what follows it.
    await eventually(lambda: gauges(env.gateway) == (0, 0, 0, 2))
    async with member(env.groups, "g") as consumer:
        await consumer.ack((await consumer.delivery()).event.event_id)
        await eventually(lambda: gauges(env.gateway) == (1, 0, 0, 0))
    # Read again as the member left (not the figures from before it joined), with the
    # checkpoint it stored: nothing left to consume.
    await eventually(lambda: gauges(env.gateway)[0] == 0)
    assert gauges(env.gateway) == (0, 0, 0, 0)


@contextlib.asynccontextmanager
async def lag_samples(gateway: Gateway) -> AsyncIterator[list[float | None]]:
    """The group's lag gauge as scraped every few milliseconds while the block runs: not
    on every turn of the loop, as a scrape collects every metric, and back to back they
    starved the gateway on a busy machine (a member's join then waited past its 10 s)."""
    lags: list[float | None] = []

    async def sample() -> None:
        while True:
            lags.append(scraped(gateway, "order_gateway_consumer_group_lag_events"))
            await asyncio.sleep(0.005)

    sampling = asyncio.create_task(sample())
    try:
        yield lags
    finally:
        sampling.cancel()


async def test_the_lag_of_a_group_nobody_consumes_is_the_one_get_consumer_group_reports(
    any_store: EventStore,
) -> None:
    # Thousands of events of other types, then one the group takes: the gauge that says
    # whether a group nobody consumes has work waiting must not count the others. Then,
    # with no more events coming, a member joins and acks it: the lag only goes down.
    async with env_of(any_store) as env:
        await env.create("g", partitions=2, event_types=["OrderCreated"])
        await env.restocks(1)
        await append_others(any_store, 5_000)
        await env.clients.create(order_request(item("p0")))
        group = await env.get()
        lag = group.head_position - group.checkpoint
        assert lag == 2  # the OrderCreated and what follows it
        await eventually(lambda: gauges(env.gateway) == (0, 0, 0, lag))
        # Another subscriber keeps the gateway's reading of the log going, as in
        # production, so that the lag of a group served here is against the head.
        subscriber = env.clients.events.Subscribe(
            event_stream_service_pb2.SubscribeRequest(from_end=True, event_types=["OrderCancelled"])
        )
        try:
            async with lag_samples(env.gateway) as lags:
                await subscriber.read()  # live: its checkpoint
                async with member(env.groups, "g") as consumer:
                    await consumer.ack((await consumer.delivery()).event.event_id)
                    await eventually(lambda: lags[-1] == 0)
        finally:
            subscriber.cancel()
    assert max(value or 0 for value in lags) <= lag


@pytest.mark.postgres
async def test_a_gateway_that_delivers_none_of_a_group_s_partitions_reports_the_store_s_lag(
    fresh_postgres_url: str,
) -> None:
    # Two replicas, a group of one partition, a member on each: one member stands by, and
    # the replica it is connected to delivers nothing of the group. Its lag is the
    # group's, not the whole log: an alert on the max over replicas must not fire.
    async with (
        env_of(await open_store(fresh_postgres_url)) as one,
        env_of(await open_store(fresh_postgres_url)) as other,
    ):
        await one.create("g", partitions=1)
        await one.restocks(20, products=20)
        async with member(one.groups, "g") as first:
            await first.ack(*[d.event.event_id for d in await first.deliveries(20)])
            await settled(one)
            await eventually(lambda: gauges(other.gateway) == (0, 0, 0, 0))
            # The other replica follows the log for a subscriber of its own, as a replica
            # serving clients does: its lag is against the head.
            subscriber = other.clients.events.Subscribe(
                event_stream_service_pb2.SubscribeRequest(
                    from_end=True, event_types=["OrderCancelled"]
                )
            )
            try:
                async with lag_samples(other.gateway) as lags:
                    await subscriber.read()
                    async with member(other.groups, "g") as standby:
                        await eventually(lambda: gauges(other.gateway)[0] == 1)
                        await asyncio.sleep(0.5)  # a lease round or two, its member standing by
                        assert standby.partitions == []
                        assert gauges(other.gateway) == (1, 0, 0, 0)
            finally:
                subscriber.cancel()
    assert max(value or 0 for value in lags) == 0


async def test_bytes_that_do_not_parse_end_the_stream_with_invalid_argument(env: Env) -> None:
    await env.create("g")
    raw: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = env.clients.channel.stream_stream(
        "/orders.v1.ConsumerGroupService/Consume"
    )
    garbage = b"\xff\xff\xff\xff\x0f"  # a truncated varint: no ConsumeRequest parses from it
    first = raw()
    await first.write(garbage)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await first.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    joined = raw()
    await joined.write(pb.ConsumeRequest(join=pb.Join(group="g")).SerializeToString())
    answer = await joined.read()
    assert isinstance(answer, bytes)
    assert pb.ConsumeResponse.FromString(answer).HasField("assignment")
    await joined.write(garbage)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(10):
            while True:  # what was sent before the garbage (assignments), then the error
                await joined.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The member left: its id is free, and the server is none the worse.
    assert (await env.get()).members == []
