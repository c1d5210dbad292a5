"""The redeliveries counter a process keeps for a group while no member of it is here:
dropped once the group is deleted, through this process or another (a replica, a
worker), so that a deleted group leaves no series behind. The memory stores and leases
stand for two processes sharing one database; no server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable

import pytest

from server.consumer_groups.engine import GroupTuning
from server.consumer_groups.leases_memory import MemoryLeases
from server.consumer_groups.model import GroupSettings
from server.consumer_groups.service import ConsumerGroups
from server.consumer_groups.store_memory import MemoryConsumerGroupStore
from server.rpc.subscription_hub import SubscriptionHub
from server.stores.memory import MemoryEventStore
from tests.consumer_groups.engine_support import delivered, restock

TUNING = GroupTuning(flush_interval=0.02, retry_base=0.02, retired_check=0.05)


@dataclasses.dataclass
class Processes:
    here: ConsumerGroups
    there: ConsumerGroups
    events: MemoryEventStore


@contextlib.asynccontextmanager
async def _two_processes(tuning: GroupTuning = TUNING) -> AsyncIterator[Processes]:
    events = MemoryEventStore()
    hub = SubscriptionHub(events, 100)
    await hub.start()
    store, leases = MemoryConsumerGroupStore(), MemoryLeases()
    here = ConsumerGroups(store, events, hub, tuning, leases)
    there = ConsumerGroups(store, events, hub, tuning, leases)
    try:
        yield Processes(here, there, events)
    finally:
        await there.stop()
        await here.stop()
        await hub.stop()


@pytest.fixture
async def processes() -> AsyncIterator[Processes]:
    async with _two_processes() as both:
        yield both


async def _one_redelivery_then_gone(groups: ConsumerGroups, events: MemoryEventStore) -> None:
    """A member here gets an event, fails it, gets it again, and leaves."""
    await restock(events, "a")
    runtime, member = await groups.join("g", "m", "user", 10)
    [event_id] = await delivered(member, 1)
    runtime.retry(member, [event_id], "not yet")
    assert await delivered(member, 1) == [event_id]
    await groups.leave(runtime, member)


async def _eventually(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not check():  # noqa: ASYNC110 - the checks run on their own
            await asyncio.sleep(0.01)


async def test_the_counter_stays_while_the_group_exists_with_no_member_here(
    processes: Processes,
) -> None:
    await processes.here.create("g", GroupSettings(partitions=1))
    await _one_redelivery_then_gone(processes.here, processes.events)
    await asyncio.sleep(10 * TUNING.retired_check)  # checked several times meanwhile
    assert processes.here.redeliveries() == {"g": 1}


async def test_a_group_deleted_through_another_process_drops_the_counter_here(
    processes: Processes,
) -> None:
    await processes.here.create("g", GroupSettings(partitions=1))
    await _one_redelivery_then_gone(processes.here, processes.events)
    assert processes.here.redeliveries() == {"g": 1}
    await processes.there.delete("g")
    await _eventually(lambda: "g" not in processes.here.redeliveries())


async def test_a_group_made_again_elsewhere_does_not_take_the_deleted_one_s_count(
    processes: Processes,
) -> None:
    settings = GroupSettings(partitions=1)
    await processes.here.create("g", settings)
    await _one_redelivery_then_gone(processes.here, processes.events)
    await processes.there.delete("g")
    await processes.there.create("g", settings)
    await _eventually(lambda: "g" not in processes.here.redeliveries())
    # A member of the new group here counts from nothing.
    runtime, member = await processes.here.join("g", "m", "user", 10)
    assert processes.here.redeliveries() == {"g": 0}
    await processes.here.leave(runtime, member)


async def test_a_worker_told_of_the_deletion_drops_the_counter_at_once() -> None:
    # No look at the store meanwhile: the supervisor's word alone.
    async with _two_processes(dataclasses.replace(TUNING, retired_check=3600)) as processes:
        record = await processes.here.create("g", GroupSettings(partitions=1))
        await _one_redelivery_then_gone(processes.here, processes.events)
        await processes.there.delete("g")
        assert processes.here.redeliveries() == {"g": 1}
        await processes.here.deleted_elsewhere("g", record.created_at)
        assert processes.here.redeliveries() == {}
