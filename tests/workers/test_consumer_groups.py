"""Consumer groups behind ``serve --workers 2``: on PostgreSQL shared through the
database's leases (as by replicas), on SQLite through the supervisor, which keeps the
leases and writes the groups' records. Members connected to different workers share a
group's partitions, never deliver one at the same time, and a killed worker's partitions
move to the others."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc
from orders.v1 import inventory_command_service_pb2 as inventory_pb
from orders.v1 import inventory_command_service_pb2_grpc as inventory_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.consumer_groups.test_service import reason_of
from tests.group_support import Member, assert_never_two_at_once, group_settings, join
from tests.workers_support import WAIT, WorkersGateway, alive, workers_gateway

CHANNELS = 8
"""Connections spread over the two workers: all on one is a 2^-7 chance."""
PARTITIONS = 8
TAKEOVER_SECONDS = 15.0
"""The contract: a dead process's partitions are taken over within this long."""
FREED_WITHIN = 4.0
"""Seconds in which a killed worker's member ids are free again: well before its leases
would expire (``LEASE_TTL``, 10 s)."""


@contextlib.asynccontextmanager
async def channels(target: str, count: int = CHANNELS) -> AsyncIterator[list[grpc.aio.Channel]]:
    # One connection each (no shared subchannel pool), so the kernel spreads them.
    opened = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count)
    ]
    try:
        yield opened
    finally:
        await asyncio.gather(*(channel.close() for channel in opened))


def stubs(opened: list[grpc.aio.Channel]) -> list[pb_grpc.ConsumerGroupServiceAsyncStub]:
    return [pb_grpc.ConsumerGroupServiceStub(channel) for channel in opened]


async def test_group_admin_is_consistent_from_every_worker(store_url: str) -> None:
    async with workers_gateway(store_url) as gateway, channels(gateway.target) as opened:
        groups = stubs(opened)
        created = await groups[0].CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(name="projections", settings=group_settings(4))
        )
        for n, stub in enumerate(groups):
            # Idempotent from any worker; another group from each.
            again = await stub.CreateConsumerGroup(
                pb.CreateConsumerGroupRequest(name="projections", settings=group_settings(4))
            )
            assert again.group.created_at == created.group.created_at
            await stub.CreateConsumerGroup(pb.CreateConsumerGroupRequest(name=f"g{n}"))
        for stub in groups:
            listed = await stub.ListConsumerGroups(pb.ListConsumerGroupsRequest())
            assert [g.name for g in listed.groups] == [
                *(f"g{n}" for n in range(CHANNELS)),
                "projections",
            ]
            found = await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="projections"))
            assert found.group.settings.partitions == 4
            with pytest.raises(grpc.aio.AioRpcError) as conflict:
                await stub.CreateConsumerGroup(
                    pb.CreateConsumerGroupRequest(name="projections", settings=group_settings(5))
                )
            assert reason_of(conflict.value) == "CONSUMER_GROUP_EXISTS"
            replayed = await stub.ReplayParked(pb.ReplayParkedRequest(name="projections"))
            assert replayed.replayed == 0
        for n, stub in enumerate(groups):
            await stub.DeleteConsumerGroup(pb.DeleteConsumerGroupRequest(name=f"g{n}"))
        for stub in groups:
            listed = await stub.ListConsumerGroups(pb.ListConsumerGroupsRequest())
            assert [g.name for g in listed.groups] == ["projections"]
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g0"))
            assert reason_of(missing.value) == "CONSUMER_GROUP_NOT_FOUND"


async def test_a_member_id_is_taken_across_workers(store_url: str) -> None:
    async with workers_gateway(store_url) as gateway, channels(gateway.target) as opened:
        groups = stubs(opened)
        await groups[0].CreateConsumerGroup(pb.CreateConsumerGroupRequest(name="g"))
        first = await join(groups[0], "g", member_id="the-one")
        for stub in groups[1:]:
            with pytest.raises(grpc.aio.AioRpcError) as taken:
                await join(stub, "g", member_id="the-one")
            assert reason_of(taken.value) == "MEMBER_ID_TAKEN"
        await first.close()


async def test_parked_events_are_seen_and_replayed_from_every_worker(store_url: str) -> None:
    async with workers_gateway(store_url) as gateway, channels(gateway.target) as opened:
        groups = stubs(opened)
        inventory = inventory_grpc.InventoryCommandServiceStub(opened[0])
        await groups[0].CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(name="g", settings=group_settings(PARTITIONS))
        )
        member = await join(groups[0], "g")
        event_id = await restock(inventory, 0)
        delivery = await member.delivery(WAIT)
        assert delivery.event.event_id == event_id
        await member.nack(event_id, action=pb.NACK_ACTION_PARK, reason="poison")

        async def parked_everywhere(count: int) -> bool:
            views = [
                (await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))).group
                for stub in groups
            ]
            return all(v.parked == count and v.checkpoint == v.head_position for v in views)

        async with asyncio.timeout(WAIT):
            while not await parked_everywhere(1):  # noqa: ASYNC110 - polled over gRPC
                await asyncio.sleep(0.1)
        replayed = [
            (await stub.ReplayParked(pb.ReplayParkedRequest(name="g"))).replayed
            for stub in reversed(groups)
        ]
        assert replayed == [1] + [0] * (CHANNELS - 1)
        again = await member.delivery(WAIT)
        assert (again.event.event_id, again.attempt) == (event_id, 1)
        await member.ack(event_id)
        async with asyncio.timeout(WAIT):
            while not await parked_everywhere(0):  # noqa: ASYNC110 - polled over gRPC
                await asyncio.sleep(0.1)
        await member.close()


async def test_a_consumer_dying_on_an_event_sees_it_parked_whichever_worker_it_reaches(
    store_url: str,
) -> None:
    async with workers_gateway(store_url) as gateway, channels(gateway.target) as opened:
        groups = stubs(opened)
        inventory = inventory_grpc.InventoryCommandServiceStub(opened[0])
        await groups[0].CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(
                name="g", settings=group_settings(PARTITIONS, max_deliveries=3)
            )
        )
        event_id = await restock(inventory, 0)
        # Each time through another connection: the attempts are counted on whichever
        # worker it lands.
        for attempt, stub in zip((1, 2, 3), groups, strict=False):
            crashing = await join(stub, "g")
            delivery = await crashing.delivery(WAIT)
            assert (delivery.event.event_id, delivery.attempt) == (event_id, attempt)
            await crashing.close()
        async with asyncio.timeout(WAIT):
            while (  # noqa: ASYNC110 - polled over gRPC
                await groups[0].GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))
            ).group.parked != 1:
                await asyncio.sleep(0.1)


async def test_a_group_deleted_through_one_worker_ends_its_members_on_every_worker(
    tmp_path: Path,
) -> None:
    async with (
        workers_gateway(f"sqlite:///{tmp_path / 'events.db'}", metrics=True) as gateway,
        channels(gateway.target, 16) as opened,
    ):
        groups = stubs(opened)
        await groups[0].CreateConsumerGroup(pb.CreateConsumerGroupRequest(name="g"))
        on = await members_on_both_workers(gateway, groups)
        members = [m for ms in on.values() for m in ms]
        await groups[0].DeleteConsumerGroup(pb.DeleteConsumerGroupRequest(name="g"))
        for member in members:
            error = await member.finished(WAIT)
            assert error is not None and error.code() == grpc.StatusCode.NOT_FOUND
            assert reason_of(error) == "CONSUMER_GROUP_NOT_FOUND"


@dataclass
class Record:
    """What the members saw: (monotonic time, member, partition, event id) per delivery."""

    deliveries: list[tuple[float, str, int, str]] = field(default_factory=list)
    acked: dict[str, str] = field(default_factory=dict)
    """Event id: the member that acked it (last)."""


async def consume(member: Member, name: str, record: Record) -> None:
    """Ack every delivery a little later (so that some are in flight at any time), until
    the stream ends (its worker killed: acks after that cannot be written)."""
    with contextlib.suppress(
        grpc.aio.AioRpcError, asyncio.InvalidStateError, asyncio.CancelledError
    ):
        while True:
            delivery = await member.delivery(3600)
            event_id = delivery.event.event_id
            record.deliveries.append((time.monotonic(), name, delivery.partition, event_id))
            await asyncio.sleep(0.02)
            await member.ack(event_id)
            record.acked[event_id] = name


async def restock(stub: inventory_grpc.InventoryCommandServiceAsyncStub, n: int) -> str:
    """One event on one of 50 streams; retried (same command) while its worker dies."""
    request = inventory_pb.RestockProductRequest(
        command_id=str(uuid.uuid4()), product_id=f"sku-{n % 50}", quantity=1
    )
    async with asyncio.timeout(WAIT):
        while True:
            try:
                (event_id,) = [r.event.event_id async for r in stub.RestockProduct(request)]
                return event_id
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.1)


async def until(check: Callable[[], bool], within: float = WAIT) -> None:
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - the members' reader tasks change the state
            await asyncio.sleep(0.05)


def members_per_worker(gateway: WorkersGateway) -> dict[str, float]:
    """The group's members connected to each worker, from the supervisor's /metrics."""
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    text = urllib.request.urlopen(url).read().decode()
    return {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "order_gateway_consumer_group_members" and sample.value
    }


async def members_on_both_workers(
    gateway: WorkersGateway, groups: list[pb_grpc.ConsumerGroupServiceAsyncStub]
) -> dict[str, list[Member]]:
    """Members of group g, one per connection, at least four, until both workers have
    some (16 connections: all on one worker is a 2^-15 chance); by worker label."""
    on: dict[str, list[Member]] = {}
    counts: dict[str, float] = {}
    for n, stub in enumerate(groups):
        member = await join(stub, "g", member_id=f"m{n}")
        now = await asyncio.to_thread(members_per_worker, gateway)
        (worker,) = [w for w, count in now.items() if count > counts.get(w, 0)]
        on.setdefault(worker, []).append(member)
        counts = now
        if n >= 3 and len(on) == 2:
            return on
    raise AssertionError("every member landed on one worker")


def stored_checkpoints(database: Path) -> dict[int, int]:
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT partition, position FROM consumer_group_checkpoints WHERE group_name = 'g'"
        ).fetchall()
    return {int(p): int(position) for p, position in rows}


def balanced(members: list[Member]) -> bool:
    owned = [p for m in members for p in m.partitions]
    counts = [len(m.partitions) for m in members]
    return sorted(owned) == list(range(PARTITIONS)) and max(counts) - min(counts) <= 1


async def test_members_on_two_workers_share_partitions_and_a_killed_worker_s_move(
    tmp_path: Path,
) -> None:
    database = tmp_path / "events.db"
    async with (
        workers_gateway(f"sqlite:///{database}", metrics=True) as gateway,
        channels(gateway.target, 16) as opened,
    ):
        groups = stubs(opened)
        inventory = inventory_grpc.InventoryCommandServiceStub(opened[0])
        await groups[0].CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(name="g", settings=group_settings(PARTITIONS))
        )
        on = await members_on_both_workers(gateway, groups)
        members = [m for ms in on.values() for m in ms]
        await until(lambda: balanced(members), within=TAKEOVER_SECONDS)
        # Every worker reports the same members and owners.
        for stub in groups:
            group = (await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))).group
            assert sorted(m.member_id for m in group.members) == sorted(
                m.member_id for m in members
            )
            owners = {p.partition: p.member_id for p in group.partition_states}
            assert owners == {p: m.member_id for m in members for p in m.partitions}

        record = Record()
        readers = [
            asyncio.create_task(consume(m, m.member_id, record), name=m.member_id) for m in members
        ]
        first = [await restock(inventory, n) for n in range(100)]
        await until(lambda: set(first) <= set(record.acked))
        head = await head_position(groups[0])

        def stored() -> bool:
            checkpoints = stored_checkpoints(database)
            return len(checkpoints) == PARTITIONS and min(checkpoints.values()) >= head

        # Settled and stored: after this, no event of the first batch may come again.
        await until(stored)
        delivered_before = len(record.deliveries)

        # Kill one worker while events flow and deliveries are in flight.
        victim = min(gateway.workers())
        flowing = asyncio.create_task(write_all(inventory, range(100, 200)))
        await until(lambda: len(record.deliveries) >= delivered_before + 20)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        await until(lambda: any(m.ended.is_set() for m in members))
        # The survivors own every partition again (the dead members' streams end as the
        # kernel closes their connections).
        await until(lambda: balanced([m for m in members if not m.ended.is_set()]))
        takeover = time.monotonic() - killed_at
        dead = [m for m in members if m.ended.is_set()]
        alive = [m for m in members if not m.ended.is_set()]
        assert dead and alive, "the members were all on one worker"
        second = await flowing
        third = await write_all(inventory, range(200, 300))
        await until(lambda: set(second + third) <= set(record.acked))
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers)
        for member in alive:
            await member.close()

    print(f"takeover {takeover:.1f} s")
    assert takeover <= TAKEOVER_SECONDS, f"partitions moved {takeover:.1f} s after the kill"
    dead_ids = {m.member_id for m in dead}
    after_kill = record.deliveries[delivered_before:]
    # Nothing settled and stored is delivered again.
    assert not {event_id for _, _, _, event_id in after_kill} & set(first)
    # Redelivered: only what a dead member held (in flight, or acked but not stored yet);
    # nothing a live member acked.
    seen: dict[str, str] = {}
    for _, name, _, event_id in after_kill:
        if event_id in seen:
            assert seen[event_id] in dead_ids, f"{event_id} delivered again after {seen}"
        seen[event_id] = name
    assert_never_two_at_once(record.deliveries, PARTITIONS)


async def test_the_members_of_a_killed_worker_rejoin_under_their_ids_at_once(
    store_url: str,
) -> None:
    """Consumers whose worker was killed -9 reconnect (to a live worker) under their own
    member ids straight away: the supervisor frees the dead worker's members as it sees
    it exit, on either store, rather than leave them until their leases expire."""
    async with (
        workers_gateway(store_url, metrics=True) as gateway,
        channels(gateway.target, 16) as opened,
    ):
        groups = stubs(opened)
        await groups[0].CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(name="g", settings=group_settings(PARTITIONS))
        )
        members = [
            m for ms in (await members_on_both_workers(gateway, groups)).values() for m in ms
        ]
        os.kill(min(gateway.workers()), signal.SIGKILL)
        await until(lambda: any(m.ended.is_set() for m in members))
        await asyncio.sleep(0.2)
        dead = [m.member_id for m in members if m.ended.is_set()]
        rejoined: list[Member] = []
        async with channels(gateway.target, 1) as fresh, asyncio.timeout(FREED_WITHIN):
            for member_id in dead:
                while True:
                    try:
                        rejoined.append(await join(stubs(fresh)[0], "g", member_id=member_id))
                        break
                    except grpc.aio.AioRpcError as error:
                        assert reason_of(error) == "MEMBER_ID_TAKEN"
                        await asyncio.sleep(0.05)
        for member in rejoined + [m for m in members if not m.ended.is_set()]:
            await member.close()
    assert sorted(m.member_id for m in rejoined) == sorted(dead)


async def head_position(stub: pb_grpc.ConsumerGroupServiceAsyncStub) -> int:
    group = (await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))).group
    return int(group.head_position)


async def write_all(
    inventory: inventory_grpc.InventoryCommandServiceAsyncStub, numbers: range
) -> list[str]:
    return [await restock(inventory, n) for n in numbers]


async def test_a_frozen_worker_s_partitions_move_when_its_leases_expire(tmp_path: Path) -> None:
    """A worker that hangs keeps its connection to the supervisor: its leases expire
    unrenewed, and the others take its partitions over within the contract's 15 s."""
    async with (
        workers_gateway(f"sqlite:///{tmp_path / 'events.db'}", metrics=True) as gateway,
        channels(gateway.target, 16) as opened,
    ):
        groups = stubs(opened)
        await groups[0].CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(name="g", settings=group_settings(PARTITIONS))
        )
        on = await members_on_both_workers(gateway, groups)
        members = [m for ms in on.values() for m in ms]
        await until(lambda: balanced(members), within=TAKEOVER_SECONDS)
        record = Record()
        readers = [asyncio.create_task(consume(m, m.member_id, record)) for m in members]
        first = await write_all(inventory_grpc.InventoryCommandServiceStub(opened[0]), range(50))
        await until(lambda: set(first) <= set(record.acked))

        victim = min(gateway.workers())
        os.kill(victim, signal.SIGSTOP)
        try:
            frozen_at = time.monotonic()
            # The frozen worker's metrics are missing from the supervisor's scrape.
            (serving,) = await asyncio.to_thread(members_per_worker, gateway)
            alive = on[serving]
            frozen = [m for worker, ms in on.items() if worker != serving for m in ms]
            await until(lambda: balanced(alive), within=WAIT)
            takeover = time.monotonic() - frozen_at
            # Written through a connection of the serving worker (member m<n> joined on
            # opened[n]): a call to the frozen one would hang.
            serving_channel = opened[int(alive[0].member_id.removeprefix("m"))]
            inventory = inventory_grpc.InventoryCommandServiceStub(serving_channel)
            second = await write_all(inventory, range(50, 150))
            await until(lambda: set(second) <= set(record.acked))
        finally:
            # SIGKILL ends a stopped process as it is; the supervisor may reap it at once.
            os.kill(victim, signal.SIGKILL)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers)
        for member in alive:
            await member.close()

    print(f"takeover {takeover:.1f} s")
    assert takeover <= TAKEOVER_SECONDS, f"partitions moved {takeover:.1f} s after the freeze"
    # The frozen members' partitions went to the others: nothing written since reached them.
    assert {m.member_id for m in frozen}.isdisjoint(
        name for _, name, _, event_id in record.deliveries if event_id in second
    )
    assert_never_two_at_once(record.deliveries, PARTITIONS)


async def test_workers_whose_supervisor_is_killed_end_their_members_without_tracebacks(
    store_url: str,
) -> None:
    async with workers_gateway(store_url) as gateway, channels(gateway.target) as opened:
        groups = stubs(opened)
        await groups[0].CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(name="g", settings=group_settings(PARTITIONS))
        )
        members = [await join(stub, "g", member_id=f"m{n}") for n, stub in enumerate(groups)]
        inventory = inventory_grpc.InventoryCommandServiceStub(opened[0])
        await write_all(inventory, range(20))
        workers = gateway.workers()
        gateway.process.send_signal(signal.SIGKILL)
        await until(lambda: not any(alive(pid) for pid in workers))
        await until(lambda: all(m.ended.is_set() for m in members))
        log = gateway.log
    # What a worker could not store with its supervisor gone is said in a line each.
    assert "Traceback" not in log
