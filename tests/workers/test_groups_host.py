"""The supervisor's side of consumer groups on SQLite (``server.workers.groups``), without
processes: the calls a worker makes, a dead worker's late calls, and deletions."""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field

import pytest

from domain.errors import StoreUnavailableError
from server.consumer_groups.leases import LocalMember
from server.consumer_groups.model import (
    FailedAttempts,
    GroupRecord,
    GroupSettings,
    MemberIdTakenError,
)
from server.consumer_groups.store_memory import MemoryConsumerGroupStore
from server.workers.groups import GroupsHost, WorkerGroupStore
from server.workers.hub_protocol import (
    GroupCall,
    decode_call_outcome,
    encode_call_outcome,
)

CREATED = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SECOND = dt.timedelta(seconds=1)
MEMBER = LocalMember("a", "user", CREATED, 0)


@dataclass
class Worker:
    replicas: set[str] = field(default_factory=set)
    connected: bool = True


def record(name: str = "g") -> GroupRecord:
    return GroupRecord(name, GroupSettings(partitions=4), CREATED, 0)


async def test_a_dead_worker_s_partitions_are_free_and_its_late_calls_refused() -> None:
    host = GroupsHost(MemoryConsumerGroupStore())
    worker, other = Worker(), Worker()
    await host.call(GroupCall("register", ("g", "r1", MEMBER)), worker)
    _, _, held = await host.call(GroupCall("round", ("g", "r1", [MEMBER], [], {0: "a"})), worker)
    assert held == {0} and worker.replicas == {"r1"}

    # The worker dies: its connection is lost, and a round it sent just before comes late.
    worker.connected = False
    host.forget(worker.replicas)
    with pytest.raises(StoreUnavailableError):
        await host.call(GroupCall("round", ("g", "r1", [MEMBER], [], {0: "a"})), worker)

    b = LocalMember("b", "user", CREATED, 0)
    live, owners, held = await host.call(GroupCall("round", ("g", "r2", [b], [], {0: "b"})), other)
    assert held == {0} and owners == {0: "b"} and [m.member_id for m in live] == ["b"]


async def test_a_deleted_group_is_announced_with_its_creation_time() -> None:
    host = GroupsHost(MemoryConsumerGroupStore())
    announced: list[tuple[str, dt.datetime]] = []
    host.on_deleted = lambda name, created_at: announced.append((name, created_at))
    await host.call(GroupCall("create_group", (record(),)), Worker())

    assert await host.call(GroupCall("delete_group", ("g",)), Worker()) is True
    assert await host.call(GroupCall("delete_group", ("g",)), Worker()) is False
    assert announced == [("g", CREATED)]


@dataclass
class Supervisor:
    """A worker's connection to ``host``, with no socket in between."""

    host: GroupsHost

    async def call(self, method: str, *args: object) -> object:
        return await self.host.call(GroupCall(method, args), Worker())


async def test_a_worker_s_failed_attempts_are_written_by_the_supervisor() -> None:
    records = MemoryConsumerGroupStore()
    worker = WorkerGroupStore(records, Supervisor(GroupsHost(records)))
    group = await worker.create_group(record())
    await worker.save_attempts(
        group, [FailedAttempts("e1", 1, 1, 2), FailedAttempts("e2", 2, 2, 1)]
    )
    await worker.forget_attempts(group, ["e2"])
    assert await worker.load_attempts("g", [1, 2]) == [FailedAttempts("e1", 1, 1, 2)]


async def test_a_worker_s_late_writes_for_a_deleted_group_miss_the_group_created_again() -> None:
    records = MemoryConsumerGroupStore()
    worker = WorkerGroupStore(records, Supervisor(GroupsHost(records)))
    old = await worker.create_group(record())
    await worker.delete_group("g")
    new = await worker.create_group(dataclasses.replace(record(), created_at=CREATED + SECOND))
    await worker.save_attempts(new, [FailedAttempts("e1", 1, 1, 2)])
    await worker.save_checkpoints(old, {0: 9})
    await worker.save_attempts(old, [FailedAttempts("e2", 2, 2, 1)])
    await worker.forget_attempts(old, ["e1"])
    assert await worker.load_checkpoints("g") == {}
    assert await worker.load_attempts("g", [1, 2]) == [FailedAttempts("e1", 1, 1, 2)]


async def test_outcomes_cross_the_socket_as_values_or_errors() -> None:
    host = GroupsHost(MemoryConsumerGroupStore())
    await host.call(GroupCall("register", ("g", "r1", MEMBER)), Worker())
    with pytest.raises(MemberIdTakenError) as raised:
        await host.call(GroupCall("register", ("g", "r2", MEMBER)), Worker())
    with pytest.raises(MemberIdTakenError) as taken:
        decode_call_outcome(encode_call_outcome(raised.value))
    assert (taken.value.group, taken.value.member_id) == ("g", "a")
    assert decode_call_outcome(encode_call_outcome(record())) == record()
    with pytest.raises(ValueError, match="no such"):
        await host.call(GroupCall("close", ()), Worker())
