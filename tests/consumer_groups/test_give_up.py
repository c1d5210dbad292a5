"""Partitions given up with their checkpoints stored: when a process lets its partitions
go (its last member left, a stop), the checkpoint it stores is where the next owner, or
the process after a restart, resumes. The rules with the memory stores and leases (the
coordinator PostgreSQL replicas and ``--workers`` use), and no server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest

from domain.errors import StoreError, StoreUnavailableError
from server.consumer_groups import leases as leases_module
from server.consumer_groups.engine import GroupTuning
from server.consumer_groups.leases import LeaseCoordinator, LocalMember
from server.consumer_groups.leases_memory import MemoryLeases
from server.consumer_groups.model import GroupRecord, GroupSettings, ParkedEvent, partition_of
from server.consumer_groups.service import ConsumerGroups
from server.consumer_groups.store_memory import MemoryConsumerGroupStore
from server.rpc.subscription_hub import SubscriptionHub
from server.stores.memory import MemoryEventStore
from tests.consumer_groups.engine_support import delivered, restock

TUNING = GroupTuning(flush_interval=0.02, retry_base=0.02)


class SlowParkStore(MemoryConsumerGroupStore):
    """Parks are stored only once ``parking`` is set (a slow database)."""

    def __init__(self) -> None:
        super().__init__()
        self.parking = asyncio.Event()
        self.parking.set()

    async def park(self, group: GroupRecord, events: Sequence[ParkedEvent]) -> None:
        await self.parking.wait()
        await super().park(group, events)


@pytest.fixture
async def hub() -> AsyncIterator[SubscriptionHub]:
    hub = SubscriptionHub(MemoryEventStore(), 100)
    await hub.start()
    yield hub
    await hub.stop()


async def test_the_last_member_leaving_while_a_park_is_stored_stores_the_checkpoint_past_it(
    hub: SubscriptionHub,
) -> None:
    events = hub.store
    assert isinstance(events, MemoryEventStore)
    store = SlowParkStore()
    groups = ConsumerGroups(store, events, hub, TUNING, MemoryLeases())
    try:
        await groups.create("g", GroupSettings(partitions=1))
        ids = [await restock(events, product) for product in "abc"]  # positions 1, 2, 3
        runtime, member = await groups.join("g", "m", "user", 10)
        assert await delivered(member, 3) == ids
        runtime.ack(member, [ids[0], ids[2]])
        # The park of the second event takes a while to store; meanwhile the member
        # leaves, and the process gives its partition up.
        store.parking.clear()
        runtime.park(member, [ids[1]], "poison")
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, store.parking.set)
        await groups.leave(runtime, member)
        # Everything up to position 3 is settled (acked or parked): a restart resumes
        # after it, and delivers neither acked event again.
        assert await store.load_checkpoints("g") == {0: 3}
        assert await store.parked_count("g") == 1
    finally:
        store.parking.set()
        await groups.stop()


def _coordinator(
    leases: MemoryLeases, members: list[LocalMember], stored: list[set[int]]
) -> LeaseCoordinator:
    async def apply(owned: dict[int, str]) -> None:
        pass

    async def release(partitions: set[int]) -> None:
        await asyncio.sleep(0.3)  # storing the checkpoints takes a while
        stored.append(partitions)

    return LeaseCoordinator(
        leases, "g", "replica-1", 4, lambda: list(members), apply, release, dict
    )


async def test_a_stop_during_a_give_up_lets_it_store_the_checkpoints_first() -> None:
    leases = MemoryLeases()
    members = [LocalMember("m", "user", dt.datetime.now(dt.UTC), 0)]
    stored: list[set[int]] = []
    coordinator = _coordinator(leases, members, stored)
    coordinator.start()
    try:
        async with asyncio.timeout(10):
            while len(coordinator.leases) < 4:  # noqa: ASYNC110 - the rounds run on their own
                await asyncio.sleep(0.01)
        members.clear()  # the member left: its partitions are given up next round
        coordinator.nudge()
        await asyncio.sleep(0.15)  # the round has begun giving them up
    finally:
        async with asyncio.timeout(10):
            await coordinator.stop()
    assert stored == [{0, 1, 2, 3}]
    _, valid = await leases.snapshot("g")
    assert valid == {}


class ForgetfulLeases(MemoryLeases):
    """A round that loses its task's cancellation, as ``asyncio.wait_for`` does on Python
    3.11 (psycopg_pool waits for a connection with it) when its wait ends at the moment
    the task is cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()

    async def round(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.waiting.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.2)
        return await super().round(*args, **kwargs)


async def test_a_stop_ends_the_rounds_even_when_a_round_lost_the_cancellation() -> None:
    leases = ForgetfulLeases()
    members = [LocalMember("m", "user", dt.datetime.now(dt.UTC), 0)]
    coordinator = _coordinator(leases, members, [])
    coordinator.start()
    await leases.waiting.wait()
    # Not under asyncio.timeout: a stop goes on when its caller is cancelled.
    stopping = asyncio.create_task(coordinator.stop())
    done, _ = await asyncio.wait({stopping}, timeout=10)
    assert stopping in done, "the stop still waits for the rounds to end"


class SlowCheckpointStore(MemoryConsumerGroupStore):
    """Checkpoints are stored only once ``saving`` is set; ``entered`` tells a save began."""

    def __init__(self) -> None:
        super().__init__()
        self.saving = asyncio.Event()
        self.saving.set()
        self.entered = asyncio.Event()

    async def save_checkpoints(self, group: GroupRecord, checkpoints: Mapping[int, int]) -> None:
        self.entered.set()
        await self.saving.wait()
        await super().save_checkpoints(group, checkpoints)


def _products_by_partition(partitions: int, each: int) -> list[list[str]]:
    found: list[list[str]] = [[] for _ in range(partitions)]
    n = 0
    while any(len(products) < each for products in found):
        products = found[partition_of(f"product-p{n}", partitions)]
        if len(products) < each:
            products.append(f"p{n}")
        n += 1
    return found


async def test_a_partition_being_given_up_is_not_reported_past_its_unsettled_events(
    hub: SubscriptionHub,
) -> None:
    """A partition moving to another replica's member while this replica's member stays:
    between dropping it and storing its checkpoint, GetConsumerGroup must not report what
    was read of it (past an event waiting for its retry) as its checkpoint."""
    events = hub.store
    assert isinstance(events, MemoryEventStore)
    store = SlowCheckpointStore()
    leases = MemoryLeases()
    tuning = dataclasses.replace(TUNING, retry_base=60.0)
    here = ConsumerGroups(store, events, hub, tuning, leases)
    there = ConsumerGroups(store, events, hub, tuning, leases)
    try:
        await here.create("g", GroupSettings(partitions=2))
        # Per partition, a first stream whose event will wait for its retry, then another.
        first_of: dict[int, tuple[str, int]] = {}
        second_ids: list[str] = []
        for partition, (first, second) in enumerate(_products_by_partition(2, 2)):
            event_id = await restock(events, first)
            first_of[partition] = (event_id, await events.head_position())
            second_ids.append(await restock(events, second))
        runtime, member = await here.join("g", "m1", "user", 10)
        await delivered(member, 4)
        runtime.retry(member, [event_id for event_id, _ in first_of.values()], "not yet")
        runtime.ack(member, second_ids)
        await asyncio.sleep(0.1)  # the failed attempts stored, the retries waiting
        store.saving.clear()
        store.entered.clear()
        await there.join("g", "m2", "user", 10)
        async with asyncio.timeout(20):
            await store.entered.wait()  # one partition is being given up to m2
        view = await here.view("g")
        for reported in view.partitions:
            _, waiting_at = first_of[reported.partition]
            assert reported.checkpoint < waiting_at, view
        assert view.checkpoint < min(position for _, position in first_of.values())
    finally:
        store.saving.set()
        await there.stop()
        await here.stop()


class _UnreachableLeases(MemoryLeases):
    """Leases whose rounds fail with ``failure`` until ``reachable`` is set."""

    def __init__(self, failure: StoreError) -> None:
        super().__init__()
        self.failure = failure
        self.reachable = False
        self.rounds = 0

    async def round(self, *args: Any, **kwargs: Any) -> Any:
        self.rounds += 1
        if not self.reachable:
            raise self.failure
        return await super().round(*args, **kwargs)


@pytest.mark.parametrize(
    ("failure", "level"),
    [
        (StoreUnavailableError("PostgreSQL is unavailable (consumer groups): refused"), "WARNING"),
        (StoreError("permission denied for table consumer_group_leases"), "ERROR"),
    ],
    ids=["unreachable", "refused"],
)
async def test_rounds_that_fail_are_said_at_most_every_interval(
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    failure: StoreError,
    level: str,
) -> None:
    # A round runs every 2 s (here 10 ms): a line each time, per group, while the
    # database was down buried the store's own fault line; so did a traceback every round
    # while the gateway's role lacked a privilege on the leases' table.
    monkeypatch.setattr(leases_module, "FAILURE_LOG_INTERVAL", 0.5)
    leases = _UnreachableLeases(failure)
    members = [LocalMember("m", "user", dt.datetime.now(dt.UTC), 0)]

    async def apply(owned: Mapping[int, str]) -> None:
        return None

    async def release(partitions: set[int]) -> None:
        return None

    coordinator = LeaseCoordinator(
        leases, "g", "replica-1", 4, lambda: list(members), apply, release, dict, interval=0.01
    )
    with caplog.at_level(logging.INFO, logger="order_gateway.consumer_groups"):
        coordinator.start()
        started = time.monotonic()
        try:
            # Rounds enough to tell one line per round from one per interval, however
            # slowly a loaded machine runs them.
            async with asyncio.timeout(30):
                while leases.rounds < 20 or time.monotonic() - started < 1.2:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            failed_rounds = leases.rounds
            failing_for = time.monotonic() - started
            leases.reachable = True
            async with asyncio.timeout(10):
                while len(coordinator.leases) < 4:  # noqa: ASYNC110 - the rounds run on their own
                    await asyncio.sleep(0.01)
        finally:
            await coordinator.stop()
    failed = [r for r in caplog.records if "lease round failed" in r.getMessage()]
    said = [r.getMessage() for r in failed]
    assert 1 <= len(said) <= 2 + failing_for / 0.5, (said, failing_for)
    assert str(failure) in said[0]
    assert {r.levelname for r in failed} == {level}
    assert all(r.exc_info is None for r in failed), "no traceback for the store's own error"
    assert len(said) < failed_rounds / 2, (said, failed_rounds)
    assert any("lease rounds work again" in r.getMessage() for r in caplog.records)


async def test_a_member_leaving_while_another_stays_leaves_its_partition_where_it_was(
    hub: SubscriptionHub,
) -> None:
    """Two members on one process under leases (as the workers of a SQLite gateway share
    them): one acks its event and leaves while the other stays, and the checkpoints are
    stored slowly. Until the next lease round its lease names it, yet its partition is
    still this process's: reported at the checkpoint reached here, with no member."""
    events = hub.store
    assert isinstance(events, MemoryEventStore)
    store = SlowCheckpointStore()
    groups = ConsumerGroups(
        store, events, hub, dataclasses.replace(TUNING, flush_interval=3600), MemoryLeases()
    )
    try:
        await groups.create("g", GroupSettings(partitions=2))
        runtime, _ = await groups.join("g", "stays", "user", 10)
        _, leaves = await groups.join("g", "leaves", "user", 10)
        async with asyncio.timeout(10):
            while leaves.partitions != [1]:  # noqa: ASYNC110 - the lease rounds run on their own
                await asyncio.sleep(0.01)
        await restock(events, _products_by_partition(2, 1)[1][0])
        position = await events.head_position()
        runtime.ack(leaves, await delivered(leaves, 1))
        assert (await groups.view("g")).partitions[1].checkpoint == position
        store.saving.clear()
        await groups.leave(runtime, leaves)
        view = await groups.view("g")
        assert (view.partitions[1].checkpoint, view.partitions[1].member_id) == (position, "")
        assert [member.member_id for member in view.members] == ["stays"]
    finally:
        store.saving.set()
        await groups.stop()


async def test_a_departed_member_s_partition_passes_to_one_that_stays_in_one_round() -> None:
    """Two members on one process, a partition each, under the leases the supervisor of a
    SQLite gateway's workers keeps; one leaves. The next lease round gives its partition
    to the member that stays, its lease kept: it is not given up (stored, and its lease
    let go for any process to claim) to be claimed again only a round later."""
    leases = MemoryLeases()
    joined = dt.datetime.now(dt.UTC)
    members = [
        LocalMember("stays", "user", joined, 0),
        LocalMember("leaves", "user", joined + dt.timedelta(seconds=1), 0),
    ]
    applied: asyncio.Queue[dict[int, str]] = asyncio.Queue()
    given_up: list[set[int]] = []

    async def apply(owned: dict[int, str]) -> None:
        applied.put_nowait(dict(owned))

    async def release(partitions: set[int]) -> None:
        given_up.append(partitions)

    # An interval no test lasts: a round runs when nudged, or when the one before changed
    # the plan, so each applied verdict is one round's.
    coordinator = LeaseCoordinator(
        leases, "g", "replica-1", 2, lambda: list(members), apply, release, dict, interval=3600
    )
    coordinator.start()
    try:
        async with asyncio.timeout(10):
            while await applied.get() != {0: "stays", 1: "leaves"}:
                pass
            members.pop()
            coordinator.nudge()
            after_departure = await applied.get()
    finally:
        await coordinator.stop()
    assert after_departure == {0: "stays", 1: "stays"}
    assert given_up == []
