"""Failed attempts are counted in the group store, not in one process: the rules, with the
memory stores and no server. Two ``ConsumerGroups`` on one store and one set of leases
stand for two replicas (or a gateway before and after a restart)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest
from orders.v1 import consumer_group_service_pb2 as pb

from server.consumer_groups.engine import GroupRuntime, GroupTuning, Member
from server.consumer_groups.leases_memory import MemoryLeases
from server.consumer_groups.model import (
    FailedAttempts,
    GroupNotFoundError,
    GroupRecord,
    GroupSettings,
    partition_of,
)
from server.consumer_groups.service import ConsumerGroups
from server.consumer_groups.store_memory import MemoryConsumerGroupStore
from server.rpc.subscription_hub import SubscriptionHub
from server.stores.memory import MemoryEventStore
from tests.conformance.contract import commit_of

TUNING = GroupTuning(flush_interval=0.02, retry_base=0.02)


class SpyStore(MemoryConsumerGroupStore):
    """Records the calls about attempts; ``counting`` cleared holds their writes back."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.counting = asyncio.Event()
        self.counting.set()

    async def save_attempts(self, group: GroupRecord, attempts: Sequence[FailedAttempts]) -> None:
        self.calls.append("save_attempts")
        await self.counting.wait()
        await super().save_attempts(group, attempts)

    async def forget_attempts(self, group: GroupRecord, event_ids: Sequence[str]) -> None:
        self.calls.append("forget_attempts")
        await super().forget_attempts(group, event_ids)

    async def stored(self, name: str = "g") -> dict[str, int]:
        return {a.event_id: a.attempts for a in await self.load_attempts(name, range(256))}


async def until(read: Callable[[], Awaitable[object]], expected: object) -> None:
    """Wait until ``read()`` answers ``expected`` (the runtime stores what it must soon)."""
    async with asyncio.timeout(5):
        while await read() != expected:  # noqa: ASYNC110 - polls the store
            await asyncio.sleep(0.02)


@dataclass
class Consumer:
    """A member of a group, its deliveries read into a queue as they are sent."""

    groups: ConsumerGroups
    runtime: GroupRuntime
    member: Member
    inbox: asyncio.Queue[pb.Delivery] = field(default_factory=asyncio.Queue)
    reader: asyncio.Task[None] | None = None
    ended: Exception | None = None
    """What ended the member's stream."""

    async def read(self) -> None:
        try:
            async for message in self.member.messages():
                if message.WhichOneof("message") == "delivery":
                    await self.inbox.put(message.delivery)
        except Exception as e:
            self.ended = e

    async def delivery(self, within: float = 10) -> pb.Delivery:
        async with asyncio.timeout(within):
            return await self.inbox.get()

    async def no_delivery(self, within: float) -> None:
        with contextlib.suppress(TimeoutError):
            delivery = await self.delivery(within)
            raise AssertionError(f"unexpected delivery {delivery}")

    async def leave(self) -> None:
        await self.groups.leave(self.runtime, self.member)
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader


@dataclass
class Env:
    events: MemoryEventStore
    hub: SubscriptionHub
    store: SpyStore
    leases: MemoryLeases | None
    processes: list[ConsumerGroups] = field(default_factory=list)

    def process(self, tuning: GroupTuning = TUNING) -> ConsumerGroups:
        """A gateway process on the shared store (a replica, with ``leases``)."""
        groups = ConsumerGroups(self.store, self.events, self.hub, tuning, self.leases)
        self.processes.append(groups)
        return groups

    async def create(
        self, groups: ConsumerGroups, max_deliveries: int = 5, partitions: int = 1
    ) -> GroupRecord:
        return await groups.create(
            "g", GroupSettings(partitions=partitions, max_deliveries=max_deliveries)
        )

    async def restock(self, stream: str = "product-1") -> str:
        version = len(await self.events.read_stream(stream)) + 1
        commit = commit_of([(stream, version)])
        event = dataclasses.replace(
            commit.events[0],
            event_type="ProductRestocked",
            data=b'{"product_id": "1", "quantity": 1, "available_after": 1}',
        )
        await self.events.append(dataclasses.replace(commit, events=[event]))
        return event.event_id

    async def join(self, groups: ConsumerGroups, member_id: str) -> Consumer:
        runtime, member = await groups.join("g", member_id, "user", 10)
        consumer = Consumer(groups, runtime, member)
        consumer.reader = asyncio.create_task(consumer.read())
        return consumer


@pytest.fixture(params=["one process", "replicas"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    events = MemoryEventStore()
    hub = SubscriptionHub(events, 100)
    await hub.start()
    leases = MemoryLeases() if request.param == "replicas" else None
    env = Env(events, hub, SpyStore(), leases)
    try:
        yield env
    finally:
        env.store.counting.set()  # a test that failed may have left writes held back
        for groups in env.processes:
            await groups.stop()
        await hub.stop()


async def test_an_event_acked_at_its_first_delivery_costs_no_attempts_write(env: Env) -> None:
    groups = env.process()
    await env.create(groups)
    await env.restock("product-1")
    await env.restock("product-2")
    consumer = await env.join(groups, "m")
    for _ in range(2):
        delivery = await consumer.delivery()
        assert delivery.attempt == 1
        consumer.runtime.ack(consumer.member, [delivery.event.event_id])
    await consumer.leave()
    assert env.store.calls == []


async def test_a_failure_is_stored_before_the_event_is_delivered_again(env: Env) -> None:
    groups = env.process()
    await env.create(groups)
    event_id = await env.restock()
    consumer = await env.join(groups, "m")
    assert (await consumer.delivery()).attempt == 1
    env.store.counting.clear()
    consumer.runtime.retry(consumer.member, [event_id], "try again")
    await consumer.no_delivery(0.3)  # retry_base is 0.02 s: only the write holds it back
    assert env.store.calls == ["save_attempts"]
    env.store.counting.set()
    again = await consumer.delivery()
    assert (again.event.event_id, again.attempt) == (event_id, 2)
    assert await env.store.stored() == {event_id: 1}
    # Settled: the count is forgotten (with the next flush).
    consumer.runtime.ack(consumer.member, [event_id])
    await until(lambda: env.store.stored(), {})
    await consumer.leave()


async def test_attempts_go_on_in_the_next_process_and_park_at_max_deliveries(env: Env) -> None:
    first = env.process()
    await env.create(first, max_deliveries=3)
    poison = await env.restock()
    after = await env.restock()  # same stream: it waits for the poison event
    # A consumer that dies on the event, twice: departures are failed attempts.
    for attempt in (1, 2):
        consumer = await env.join(first, "m")
        delivery = await consumer.delivery()
        assert (delivery.event.event_id, delivery.attempt) == (poison, attempt)
        await consumer.leave()
        assert first.runtimes.get("g") is None
    assert await env.store.stored() == {poison: 2}
    # Another process (a restart, or another replica) goes on counting.
    consumer = await env.join(env.process(), "m")
    delivery = await consumer.delivery()
    assert (delivery.event.event_id, delivery.attempt) == (poison, 3)
    consumer.runtime.retry(consumer.member, [poison], "still failing")
    delivery = await consumer.delivery()
    assert (delivery.event.event_id, delivery.attempt) == (after, 1)
    await until(lambda: env.store.parked_count("g"), 1)
    assert await env.store.stored() == {}  # parking forgot the count
    await consumer.leave()


async def test_the_backoff_follows_the_stored_count(env: Env) -> None:
    group = await env.create(env.process(), max_deliveries=5)
    event_id = await env.restock()
    await env.store.save_attempts(group, [FailedAttempts(event_id, 1, 0, 2)])
    consumer = await env.join(env.process(dataclasses.replace(TUNING, retry_base=0.1)), "m")
    assert (await consumer.delivery()).attempt == 3
    nacked = time.monotonic()
    consumer.runtime.retry(consumer.member, [event_id], "try again")
    again = await consumer.delivery()
    waited = time.monotonic() - nacked
    # After the 3rd failure: 0.1 s * 2**2, where a count started again would wait 0.1 s.
    assert again.attempt == 4
    assert 0.38 <= waited < 2, waited
    await consumer.leave()


async def test_a_nack_s_backoff_holds_in_the_next_process(env: Env) -> None:
    slow = dataclasses.replace(TUNING, retry_base=0.6)
    first = env.process(slow)
    await env.create(first)
    event_id = await env.restock()
    consumer = await env.join(first, "m")
    assert (await consumer.delivery()).attempt == 1
    nacked = time.monotonic()
    consumer.runtime.retry(consumer.member, [event_id], "try again")
    await until(lambda: env.store.stored(), {event_id: 1})
    await consumer.leave()  # in its backoff, not in flight: leaving is no failure
    assert first.runtimes.get("g") is None
    # Another process (another replica, or this one restarted) waits out the backoff.
    again = await env.join(env.process(slow), "m")
    delivery = await again.delivery()
    waited = time.monotonic() - nacked
    assert (delivery.event.event_id, delivery.attempt) == (event_id, 2)
    assert 0.55 <= waited < 3, waited
    await again.leave()


async def test_a_shutdown_is_no_failed_attempt(env: Env) -> None:
    first = env.process()
    await env.create(first)
    event_id = await env.restock()
    consumer = await env.join(first, "m")
    assert (await consumer.delivery()).attempt == 1
    await first.stop()
    assert await env.store.stored() == {}
    again = await env.join(env.process(), "m")
    delivery = await again.delivery()
    assert (delivery.event.event_id, delivery.attempt) == (event_id, 1)
    await again.leave()


async def test_a_replayed_event_starts_at_attempt_one_and_is_counted_again(env: Env) -> None:
    groups = env.process()
    await env.create(groups, max_deliveries=2)
    event_id = await env.restock()
    consumer = await env.join(groups, "m")
    for attempt in (1, 2):
        delivery = await consumer.delivery()
        assert (delivery.event.event_id, delivery.attempt) == (event_id, attempt)
        consumer.runtime.retry(consumer.member, [event_id], "no")
    await until(lambda: env.store.parked_count("g"), 1)
    assert await env.store.stored() == {}
    await groups.replay_parked("g", 0)
    delivery = await consumer.delivery()
    assert (delivery.event.event_id, delivery.attempt) == (event_id, 1)
    consumer.runtime.retry(consumer.member, [event_id], "not yet")
    delivery = await consumer.delivery()
    assert (delivery.event.event_id, delivery.attempt) == (event_id, 2)
    assert await env.store.stored() == {event_id: 1}
    # Settled after the replay: unparked, its count forgotten with it.
    consumer.runtime.ack(consumer.member, [event_id])
    await until(lambda: env.store.replaying("g", 10), [])
    assert await env.store.stored() == {}
    assert await env.store.parked_count("g") == 0
    await consumer.leave()


def one_stream_per_partition(partitions: int) -> list[str]:
    streams: dict[int, str] = {}
    n = 0
    while len(streams) < partitions:
        streams.setdefault(partition_of(f"product-{n}", partitions), f"product-{n}")
        n += 1
    return [streams[p] for p in range(partitions)]


@pytest.mark.parametrize("where", ["on the same process", "on another process"])
async def test_a_partition_moved_from_a_connected_member_is_no_failed_attempt(
    env: Env, where: str
) -> None:
    if env.leases is None and where == "on another process":
        pytest.skip("without leases, two processes do not share the partitions")
    groups = env.process()
    await env.create(groups, max_deliveries=2, partitions=2)
    ids = [await env.restock(stream) for stream in one_stream_per_partition(2)]
    first = await env.join(groups, "first")
    held = {(await first.delivery()).event.event_id for _ in ids}
    assert held == set(ids)
    # Another member joins: one partition moves to it, its delivery with it.
    second = await env.join(groups if where == "on the same process" else env.process(), "second")
    moved = await second.delivery()
    assert moved.attempt == 1
    assert await env.store.stored() == {}
    # max_deliveries counts the failures only: the first one does not park it.
    event_id = moved.event.event_id
    second.runtime.retry(second.member, [event_id], "no")
    again = await second.delivery()
    assert (again.event.event_id, again.attempt) == (event_id, 2)
    assert await env.store.stored() == {event_id: 1}
    second.runtime.retry(second.member, [event_id], "still no")
    await until(lambda: env.store.parked_count("g"), 1)
    (staying,) = held - {event_id}
    first.runtime.ack(first.member, [staying])
    await second.leave()
    await first.leave()


async def test_a_delivery_queued_when_its_partition_moves_and_comes_back_is_sent_once(
    env: Env,
) -> None:
    if env.leases is not None:
        pytest.skip("across replicas a partition moves through the store, as new entries")
    groups = env.process()
    await env.create(groups, partitions=2)
    ids = [await env.restock(stream) for stream in one_stream_per_partition(2)]
    runtime, member = await groups.join("g", "first", "user", 10)
    async with asyncio.timeout(5):
        while len(member.in_flight) < len(ids):  # noqa: ASYNC110 - delivered by the runtime
            await asyncio.sleep(0.01)
    # Both deliveries queued, not read yet: a member joins and leaves before any delivery
    # is made to it, and the partition it held meanwhile comes back with its event, at the
    # same attempt. The delivery queued before the move is not sent besides the new one.
    passing = runtime.join("passing", "user", 10, dt.datetime.now(dt.UTC))
    runtime.leave(passing)
    first = Consumer(groups, runtime, member)
    first.reader = asyncio.create_task(first.read())
    received = [await first.delivery() for _ in ids]
    assert sorted(d.event.event_id for d in received) == sorted(ids)
    assert [d.attempt for d in received] == [1, 1]
    await first.no_delivery(0.2)
    await first.leave()


@pytest.mark.parametrize("env", ["replicas"], indirect=True)
async def test_a_group_deleted_and_created_again_through_another_process_is_a_new_group(
    env: Env,
) -> None:
    a, b = env.process(), env.process()
    await env.create(a)
    stale = await env.join(b, "m")
    event_id = await env.restock()
    assert (await stale.delivery()).event.event_id == event_id
    # Memory leases never tell b of the deletion: its runtime of the deleted group goes
    # on, as a PostgreSQL replica's does until its next lease round.
    await a.delete("g")
    created_again = await env.create(a)

    async def calls() -> list[str]:
        return env.store.calls

    stale.runtime.retry(stale.member, [event_id], "failed")
    await until(calls, ["save_attempts"])
    assert await env.store.stored() == {}  # not counted for the new group
    # Joined through b, the new group: the deleted one's members end with NOT_FOUND.
    fresh = await env.join(b, "m2")
    assert fresh.runtime.record == created_again
    delivery = await fresh.delivery()
    assert (delivery.event.event_id, delivery.attempt) == (event_id, 1)
    assert stale.reader is not None
    await stale.reader
    assert isinstance(stale.ended, GroupNotFoundError)
    await fresh.leave()


async def test_a_group_created_again_elsewhere_is_reported_without_the_deleted_one_s_runtime(
    env: Env,
) -> None:
    if env.leases is not None:
        pytest.skip("across replicas the members are the leases' (the database drops them)")
    a, b = env.process(), env.process()
    await env.create(a)
    stale = await env.join(b, "m")
    await a.delete("g")
    created_again = await env.create(a)
    # b still runs the deleted group's runtime (it has not heard): its members are not
    # reported as the new group's.
    view = await b.view("g")
    assert (view.record, view.members) == (created_again, ())
    await stale.leave()
