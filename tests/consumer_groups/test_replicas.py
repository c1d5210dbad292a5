"""A consumer group across two gateway processes on one PostgreSQL database: the
partitions are shared, a killed replica's partitions move within 15 s, and no partition
is ever delivered by two members at once."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc
import psycopg
import pytest
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc
from orders.v1 import inventory_command_service_pb2 as inventory_pb
from orders.v1 import inventory_command_service_pb2_grpc as inventory_grpc

from tests.group_support import Member, assert_never_two_at_once, join
from tests.serving import free_port, gateway_log, start_gateway, wait_until_serving

pytestmark = pytest.mark.postgres

PARTITIONS = 8


@contextlib.contextmanager
def replica(url: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    target = f"127.0.0.1:{free_port()}"
    process = start_gateway(["serve", "--listen", target, "--store", url])
    try:
        yield target, process
    except BaseException:
        print(f"log of the gateway at {target}:\n{gateway_log(process)}")  # shown on failure
        raise
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class Record:
    """Who delivered what, when (monotonic seconds), as the members saw it."""

    deliveries: list[tuple[float, str, int, str]] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)


async def consume(consumer: Member, name: str, record: Record) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        while True:
            delivery = await consumer.delivery(3600)
            record.deliveries.append(
                (time.monotonic(), name, delivery.partition, delivery.event.event_id)
            )
            record.acked.add(delivery.event.event_id)
            await consumer.ack(delivery.event.event_id)


async def restock(stub: inventory_grpc.InventoryCommandServiceAsyncStub, n: int) -> str:
    request = inventory_pb.RestockProductRequest(product_id=f"sku-{n % 50}", quantity=1)
    (event_id,) = [r.event.event_id async for r in stub.RestockProduct(request)]
    return event_id


async def until(check: object, within: float) -> None:
    assert callable(check)
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - the members' reader tasks change the state
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def channel_to(target: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield channel


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    groups: pb_grpc.ConsumerGroupServiceAsyncStub
    inventory: inventory_grpc.InventoryCommandServiceAsyncStub


@contextlib.asynccontextmanager
async def two_replicas(url: str) -> AsyncIterator[tuple[Replica, Replica]]:
    """Two gateways serving one database, and a group "g" of ``PARTITIONS`` partitions."""
    with replica(url) as (target_a, a), replica(url) as (target_b, b):
        await wait_until_serving(target_a, a)
        await wait_until_serving(target_b, b)
        async with channel_to(target_a) as channel_a, channel_to(target_b) as channel_b:
            on_a = Replica(
                a,
                pb_grpc.ConsumerGroupServiceStub(channel_a),
                inventory_grpc.InventoryCommandServiceStub(channel_a),
            )
            on_b = Replica(
                b,
                pb_grpc.ConsumerGroupServiceStub(channel_b),
                inventory_grpc.InventoryCommandServiceStub(channel_b),
            )
            await on_a.groups.CreateConsumerGroup(
                pb.CreateConsumerGroupRequest(
                    name="g", settings=pb.ConsumerGroupSettings(partitions=PARTITIONS)
                )
            )
            yield on_a, on_b


async def test_a_killed_replica_s_partitions_move_and_none_is_delivered_twice_at_once(
    fresh_postgres_url: str,
) -> None:
    async with two_replicas(fresh_postgres_url) as (a, b):
        groups_a, groups_b, inventory = a.groups, b.groups, a.inventory
        on_a = await join(groups_a, "g", member_id="on-a")
        on_b = await join(groups_b, "g", member_id="on-b")
        # Balanced across the replicas: 4 and 4, each partition once.
        await until(
            lambda: (
                sorted(on_a.partitions + on_b.partitions) == list(range(PARTITIONS))
                and len(on_a.partitions) == len(on_b.partitions)
            ),
            within=15,
        )
        group = (await groups_b.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))).group
        assert sorted(m.member_id for m in group.members) == ["on-a", "on-b"]
        owners = {p.partition: p.member_id for p in group.partition_states}
        assert owners == {
            **{p: "on-a" for p in on_a.partitions},
            **{p: "on-b" for p in on_b.partitions},
        }

        record = Record()
        workers = [
            asyncio.create_task(consume(on_a, "on-a", record)),
            asyncio.create_task(consume(on_b, "on-b", record)),
        ]
        written = [await restock(inventory, n) for n in range(100)]
        await until(lambda: record.acked >= set(written), within=30)

        b.process.send_signal(signal.SIGKILL)
        b.process.wait()
        killed_at = time.monotonic()
        await until(lambda: on_a.partitions == list(range(PARTITIONS)), within=30)
        takeover = time.monotonic() - killed_at
        written += [await restock(inventory, n) for n in range(100, 200)]
        await until(lambda: record.acked >= set(written), within=30)
        for task in workers:
            task.cancel()
        await on_a.close()
        await on_b.close()

    print(f"takeover {takeover:.1f} s")
    assert takeover <= 15, f"partitions moved {takeover:.1f} s after the kill"
    assert_never_two_at_once(record.deliveries, PARTITIONS)


async def test_every_replica_reports_the_deliveries_in_flight_on_another(
    fresh_postgres_url: str,
) -> None:
    async with two_replicas(fresh_postgres_url) as (a, b):
        groups_a, groups_b, inventory = a.groups, b.groups, a.inventory
        on_a = await join(groups_a, "g", member_id="on-a")
        await until(lambda: on_a.partitions == list(range(PARTITIONS)), within=15)
        for n in range(20):
            await restock(inventory, n)
        # Held, never acked: 20 restocks of 20 products, one event each.
        held = await on_a.deliveries(20)
        expected: dict[int, int] = {}
        for delivery in held:
            expected[delivery.partition] = expected.get(delivery.partition, 0) + 1

        async def seen_from_b() -> pb.ConsumerGroup:
            request = pb.GetConsumerGroupRequest(name="g")
            return (await groups_b.GetConsumerGroup(request)).group

        # B has no member of the group: everything it reports comes from A's leases,
        # written with their renewals (every 2 s).
        async with asyncio.timeout(15):
            while True:
                group = await seen_from_b()
                per_partition = {p.partition: p.in_flight for p in group.partition_states}
                if {p: n for p, n in per_partition.items() if n} == expected:
                    break
                await asyncio.sleep(0.2)
        assert group.in_flight == 20
        assert [(m.member_id, m.in_flight) for m in group.members] == [("on-a", 20)]
        assert {p.member_id for p in group.partition_states} == {"on-a"}

        await on_a.ack(*(d.event.event_id for d in held))
        async with asyncio.timeout(15):
            while (await seen_from_b()).in_flight:  # noqa: ASYNC110 - polls a server
                await asyncio.sleep(0.2)
        await on_a.close()


async def test_a_group_deleted_on_one_replica_ends_its_members_on_the_other(
    fresh_postgres_url: str,
) -> None:
    async with two_replicas(fresh_postgres_url) as (a, b):
        groups_a, groups_b = a.groups, b.groups
        on_b = await join(groups_b, "g", member_id="on-b")
        await until(lambda: on_b.partitions == list(range(PARTITIONS)), within=15)
        await groups_a.DeleteConsumerGroup(pb.DeleteConsumerGroupRequest(name="g"))
        error = await on_b.finished(within=10)
        assert error is not None and error.code() == grpc.StatusCode.NOT_FOUND
        # A new group of that name is served afresh by the replica that had members.
        await groups_a.CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(name="g", settings=pb.ConsumerGroupSettings(partitions=2))
        )
        again = await join(groups_b, "g", member_id="on-b")
        await until(lambda: again.partitions == [0, 1], within=15)
        await again.close()
        assert "lease round failed" not in gateway_log(b.process)


async def test_a_failed_attempt_on_one_replica_counts_on_the_other(
    fresh_postgres_url: str,
) -> None:
    async with two_replicas(fresh_postgres_url) as (a, b):
        on_a = await join(a.groups, "g", member_id="on-a")
        await until(lambda: on_a.partitions == list(range(PARTITIONS)), within=15)
        event_id = await restock(a.inventory, 0)
        delivery = await on_a.delivery()
        assert (delivery.event.event_id, delivery.attempt) == (event_id, 1)
        # A consumer that crashes on the event and reconnects through another replica.
        await on_a.close()
        on_b = await join(b.groups, "g", member_id="on-b")
        delivery = await on_b.delivery(30)
        assert (delivery.event.event_id, delivery.attempt) == (event_id, 2)
        await on_b.ack(event_id)
        await on_b.close()


async def lease_round_of(url: str, group: str) -> None:
    """Return just after a lease round renewed the group's members (every 2 s): the next
    one is about 2 s away."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:

        async def renewed() -> object:
            cursor = await conn.execute(
                "SELECT max(expires_at) FROM consumer_group_members WHERE group_name = %s",
                (group,),
            )
            row = await cursor.fetchone()
            return row[0] if row else None

        before = await renewed()
        async with asyncio.timeout(10):
            while await renewed() == before:  # noqa: ASYNC110 - polls the database
                await asyncio.sleep(0.01)


async def test_a_group_created_again_at_once_on_one_replica_gets_no_writes_of_the_old(
    fresh_postgres_url: str,
) -> None:
    async with two_replicas(fresh_postgres_url) as (a, b):
        on_b = await join(b.groups, "g", member_id="on-b")
        await until(lambda: on_b.partitions == list(range(PARTITIONS)), within=15)
        record = Record()
        consuming = asyncio.create_task(consume(on_b, "on-b", record))
        written = [await restock(a.inventory, n) for n in range(20)]
        await until(lambda: record.acked >= set(written), within=30)
        # Deleted and created again right after B's lease round: B learns of it at its next
        # one, and its runtime of the deleted group delivers, acks and flushes (every
        # 0.5 s) what is written until then.
        await lease_round_of(fresh_postgres_url, "g")
        await a.groups.DeleteConsumerGroup(pb.DeleteConsumerGroupRequest(name="g"))
        await a.groups.CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(
                name="g", settings=pb.ConsumerGroupSettings(partitions=PARTITIONS)
            )
        )
        written += [await restock(a.inventory, n) for n in range(20, 60)]
        error = await on_b.finished(within=10)
        assert error is not None and error.code() == grpc.StatusCode.NOT_FOUND
        consuming.cancel()
        # The new group starts at the beginning of the log: a member gets every event.
        fresh = await join(a.groups, "g", member_id="fresh")
        delivered: set[str] = set()
        async with asyncio.timeout(30):
            while delivered < set(written):
                delivery = await fresh.delivery(30)
                delivered.add(delivery.event.event_id)
                await fresh.ack(delivery.event.event_id)
        await fresh.close()
