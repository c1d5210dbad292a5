"""Partition leases in the supervisor's memory (SQLite's workers): PostgreSQL's rules,
with a clock the tests move."""

from __future__ import annotations

import datetime as dt

import pytest

from server.consumer_groups.leases import LocalMember, PartitionLease
from server.consumer_groups.leases_memory import MemoryLeases
from server.consumer_groups.model import MemberIdTakenError

JOINED = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def member(member_id: str, in_flight: int = 0) -> LocalMember:
    return LocalMember(member_id, "user", JOINED, in_flight)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def leases(clock: Clock) -> MemoryLeases:
    return MemoryLeases(ttl=10, clock=clock)


async def test_a_partition_is_held_by_one_replica_until_its_lease_expires(
    leases: MemoryLeases, clock: Clock
) -> None:
    _, owners, held = await leases.round("g", "r1", [member("a")], [], {0: "a", 1: "a"})
    assert held == {0, 1} and owners == {0: "a", 1: "a"}

    _, owners, held = await leases.round("g", "r2", [member("b")], [], {0: "b"})
    assert held == set() and owners == {0: "a", 1: "a"}

    # r1 renews within the lease; then it stops renewing and the lease runs out.
    clock.now += 9
    await leases.round("g", "r1", [member("a")], [], {0: "a", 1: "a"})
    clock.now += 9
    _, _, held = await leases.round("g", "r2", [member("b")], [], {0: "b"})
    assert held == set()
    clock.now += 1.5
    live, owners, held = await leases.round("g", "r2", [member("b")], [], {0: "b"})
    assert held == {0} and owners == {0: "b"}
    assert [m.member_id for m in live] == ["b"]


async def test_released_partitions_and_departed_members_are_free_at_once(
    leases: MemoryLeases,
) -> None:
    await leases.round("g", "r1", [member("a"), member("c")], [], {0: "a", 1: "a", 2: "c"})
    # Partition 0 released; c left r1 (its partition 2 goes with it).
    live, owners, _ = await leases.round("g", "r1", [member("a")], [0], {1: "a"})
    assert owners == {1: "a"} and [m.member_id for m in live] == ["a"]
    _, _, held = await leases.round("g", "r2", [member("b")], [], {0: "b", 2: "b"})
    assert held == {0, 2}


async def test_a_member_id_is_taken_while_its_member_lives(
    leases: MemoryLeases, clock: Clock
) -> None:
    await leases.register("g", "r1", member("a"))
    with pytest.raises(MemberIdTakenError):
        await leases.register("g", "r2", member("a"))
    # Another group's ids are its own.
    await leases.register("h", "r2", member("a"))
    clock.now += 11
    await leases.register("g", "r2", member("a"))
    live, _ = await leases.snapshot("g")
    assert [(m.member_id, m.replica_id) for m in live] == [("a", "r2")]


async def test_a_departed_member_s_id_is_free_on_its_own_replica_at_once(
    leases: MemoryLeases,
) -> None:
    # The replica registers only ids none of its members has: its own entry under the id
    # is a departed member's, which no round has forgotten yet.
    await leases.register("g", "r1", member("a"))
    await leases.register("g", "r1", member("a"))
    with pytest.raises(MemberIdTakenError):
        await leases.register("g", "r2", member("a"))


async def test_a_forgotten_replica_frees_its_members_and_partitions(leases: MemoryLeases) -> None:
    await leases.register("g", "r1", member("a"))
    await leases.round("g", "r1", [member("a", in_flight=3)], [], {0: "a", 1: "a"}, {1: 3})
    await leases.round("h", "r1", [member("a")], [], {0: "a"})
    live, owners = await leases.snapshot("g")
    assert [(m.member_id, m.in_flight) for m in live] == [("a", 3)]
    # Each lease carries its partition's deliveries in flight, as its renewal gave them.
    assert owners == {0: PartitionLease("a", 0), 1: PartitionLease("a", 3)}

    leases.forget(["r1"])

    assert await leases.snapshot("g") == ([], {})
    assert await leases.snapshot("h") == ([], {})
    await leases.register("g", "r2", member("a"))
    _, _, held = await leases.round("g", "r2", [member("a")], [], {0: "a", 1: "a"})
    assert held == {0, 1}


async def test_leave_frees_one_group_only(leases: MemoryLeases) -> None:
    await leases.round("g", "r1", [member("a")], [], {0: "a"})
    await leases.round("h", "r1", [member("a")], [], {0: "a"})
    await leases.leave("g", "r1")
    assert await leases.snapshot("g") == ([], {})
    _, owners = await leases.snapshot("h")
    assert owners == {0: PartitionLease("a", 0)}
