"""A group's runtime (its reader, flush, count and lease tasks) runs exactly while members
use it: joins that fail, are refused or race a shutdown leave none running; what a
runtime keeps per member and per group stays bounded; overlapping looks for replayed
parked events take each one up once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator

import pytest

from domain.errors import StoreUnavailableError
from server.consumer_groups.engine import GroupRuntime, GroupTuning, Member
from server.consumer_groups.leases_memory import MemoryLeases
from server.consumer_groups.model import GroupClosedError, GroupSettings, MemberIdTakenError
from server.consumer_groups.service import ConsumerGroups
from server.consumer_groups.store_memory import MemoryConsumerGroupStore
from server.rpc.subscription_hub import SubscriptionHub
from server.stores.memory import MemoryEventStore
from tests.consumer_groups.engine_support import delivered, restock

TUNING = GroupTuning(flush_interval=0.01)


class TroubledCountStore(MemoryConsumerGroupStore):
    """``parked_count``, the last step of a runtime's start, fails ``fail`` times, or
    waits while ``hold`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = 0
        self.hold: asyncio.Event | None = None
        self.held = asyncio.Event()

    async def parked_count(self, name: str) -> int:
        if self.fail:
            self.fail -= 1
            raise StoreUnavailableError("PostgreSQL is unavailable: refused")
        if self.hold is not None:
            self.held.set()
            await self.hold.wait()
        return await super().parked_count(name)


def group_tasks() -> list[str]:
    return sorted(
        task.get_name()
        for task in asyncio.all_tasks()
        if task.get_name().startswith("group-") and not task.done()
    )


@contextlib.asynccontextmanager
async def hub_of(events: MemoryEventStore) -> AsyncIterator[SubscriptionHub]:
    hub = SubscriptionHub(events, 100)
    await hub.start()
    try:
        yield hub
    finally:
        await hub.stop()


@pytest.mark.parametrize("how", ["store-error", "cancelled"])
async def test_a_join_that_fails_as_its_runtime_starts_leaves_nothing_running(how: str) -> None:
    # The runtime had begun reading and flushing; nothing stopped it, not even shutdown,
    # and each retry while a store flapped left another.
    events, store = MemoryEventStore(), TroubledCountStore()
    async with hub_of(events) as hub:
        groups = ConsumerGroups(store, events, hub, TUNING)
        try:
            await groups.create("g", GroupSettings(partitions=1))
            if how == "store-error":
                store.fail = 1
                with pytest.raises(StoreUnavailableError):
                    await groups.join("g", "m", "user", 10)
            else:
                store.hold = asyncio.Event()
                join = asyncio.create_task(groups.join("g", "m", "user", 10))
                await store.held.wait()
                join.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await join
                store.hold = None
            assert group_tasks() == []
            assert hub.subscriber_count == 0
            runtime, member = await groups.join("g", "m", "user", 10)
            await groups.leave(runtime, member)
        finally:
            await groups.stop()
        assert group_tasks() == []


async def test_a_join_racing_shutdown_is_refused_and_leaves_nothing_running() -> None:
    events, store = MemoryEventStore(), TroubledCountStore()
    async with hub_of(events) as hub:
        groups = ConsumerGroups(store, events, hub, TUNING)
        await groups.create("g", GroupSettings(partitions=1))
        store.hold = asyncio.Event()
        join = asyncio.create_task(groups.join("g", "m", "user", 10))
        await store.held.wait()
        await groups.stop()
        store.hold.set()
        with pytest.raises(GroupClosedError):
            await join
        assert groups.runtimes == {}
        assert group_tasks() == []


async def test_a_join_refused_for_an_id_live_elsewhere_leaves_no_runtime_there() -> None:
    # Across replicas: the refusing one kept a runtime with no member, reading, flushing
    # and taking lease rounds until some member joined and left there.
    events, store, leases = MemoryEventStore(), MemoryConsumerGroupStore(), MemoryLeases()
    async with hub_of(events) as hub:
        here = ConsumerGroups(store, events, hub, TUNING, leases)
        there = ConsumerGroups(store, events, hub, TUNING, leases)
        try:
            await here.create("g", GroupSettings(partitions=2))
            runtime, member = await here.join("g", "m", "user", 10)
            with pytest.raises(MemberIdTakenError):
                await there.join("g", "m", "user", 10)
            assert there.runtimes == {}
            await here.leave(runtime, member)
        finally:
            await here.stop()
            await there.stop()
        assert group_tasks() == []


class HeldLookUp(MemoryEventStore):
    """The first one-event ``read_all`` (a parked event's look-up) waits for ``go``."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.go = asyncio.Event()
        self.waiting = asyncio.Event()

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list:  # type: ignore[type-arg]
        if limit == 1 and self.armed:
            self.armed = False
            self.waiting.set()
            await self.go.wait()
        return await super().read_all(after_position, limit)


async def settled_as_they_come(runtime: GroupRuntime, member: Member) -> list[str]:
    """The events delivered to ``member`` within half a second, each acked and the ack
    stored (the event unparked) as it comes."""
    came: list[str] = []
    with contextlib.suppress(TimeoutError):
        while True:
            (event_id,) = await asyncio.wait_for(delivered(member, 1), 0.5)
            came.append(event_id)
            runtime.ack(member, [event_id])
            await runtime._flush()
    return came


async def test_overlapping_looks_take_a_replayed_event_up_once() -> None:
    # ReplayParked's look, the flush loop's and a lease round's may overlap: one took up
    # an event while another awaited its look-up, the event was delivered and acked, and
    # the other took it up again (hundreds of acked events came again after one replay).
    events, store = HeldLookUp(), MemoryConsumerGroupStore()
    async with hub_of(events) as hub:
        groups = ConsumerGroups(store, events, hub, GroupTuning(flush_interval=3600))
        try:
            await groups.create("g", GroupSettings(partitions=1))
            x = await restock(events, "x")
            runtime, member = await groups.join("g", "m", "user", 10)
            assert await delivered(member, 1) == [x]
            runtime.park(member, [x], "poison")
            await runtime._flush()
            assert await store.replay_parked("g", 0) == 1
            events.armed = True
            first = asyncio.create_task(runtime.poll_replays())
            await events.waiting.wait()
            second = asyncio.create_task(runtime.poll_replays())
            came = await settled_as_they_come(runtime, member)
            events.go.set()
            await asyncio.gather(first, second)
            came += await settled_as_they_come(runtime, member)
            await runtime.poll_replays()
            came += await settled_as_they_come(runtime, member)
            assert came == [x]
        finally:
            await groups.stop()


async def test_a_member_that_does_not_read_keeps_one_unsent_assignment() -> None:
    # Each rebalance queued another Assignment for it, without end.
    events = MemoryEventStore()
    async with hub_of(events) as hub:
        groups = ConsumerGroups(
            MemoryConsumerGroupStore(), events, hub, GroupTuning(flush_interval=3600)
        )
        try:
            await groups.create("g", GroupSettings(partitions=2))
            for n in range(50):
                await restock(events, f"p{n}")
            runtime, stalled = await groups.join("g", "stalled", "user", 1)
            for n in range(500):
                runtime.leave(runtime.join(f"o{n}", "user", 1, stalled.joined_at))
            await asyncio.sleep(0.1)
            assert len(stalled._outbox) <= 2 * stalled.max_in_flight + 16
        finally:
            await groups.stop()


async def test_the_locks_of_groups_no_longer_used_are_let_go() -> None:
    # One lock was kept for every group name ever used, deleted or never created.
    events = MemoryEventStore()
    async with hub_of(events) as hub:
        groups = ConsumerGroups(MemoryConsumerGroupStore(), events, hub, TUNING)
        try:
            for n in range(50):
                name = f"g{n}"
                await groups.create(name, GroupSettings(partitions=1))
                runtime, member = await groups.join(name, "m", "user", 10)
                await groups.leave(runtime, member)
                await groups.delete(name)
            with pytest.raises(Exception, match="does not exist"):
                await groups.join("never-made", "m", "user", 10)
            gc.collect()
            assert len(groups._locks) == 0
        finally:
            await groups.stop()
