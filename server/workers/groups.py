"""Consumer groups shared by the workers of a SQLite gateway.

Workers on PostgreSQL share a group's partitions as replicas do, through leases in the
database. On SQLite the supervisor is that one place instead:

- it keeps the partition leases (``MemoryLeases``: the same rules, with an owner and an
  expiry each) and answers every worker's lease rounds, so a partition is delivered by at
  most one member at a time whichever workers the members are connected to; each worker
  runs the same ``leases.LeaseCoordinator`` as a PostgreSQL replica;
- it writes the groups' records (groups, checkpoints, parked events, failed attempts) on
  a connection of its own to the file, beside the events' writer, so that no worker
  queues on SQLite's write lock; workers read them from the file themselves; a worker's
  writes carry the group's record, so that those of a runtime the deletion of its group
  has not reached yet miss a group created again under the name;
- when a group is deleted, it tells every worker, whose members of the group end with
  NOT_FOUND as on the worker that deleted it;
- when a worker's connection to it is gone (the worker died), it frees that worker's
  members and leases at once: the others take the partitions over at their next round
  (two seconds), not after the leases' ten.

Calls travel as ``hub_protocol.GroupCall`` over the hub's socket.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol, cast

from domain.errors import StoreUnavailableError
from server.consumer_groups.leases import (
    LEASE_TTL,
    LeaseStore,
    LiveMember,
    LocalMember,
    PartitionLease,
)
from server.consumer_groups.leases_memory import MemoryLeases
from server.consumer_groups.model import FailedAttempts, GroupRecord, ParkedEvent
from server.consumer_groups.ports import ConsumerGroupStore
from server.workers.hub_protocol import GroupCall

_WRITES = frozenset(
    {
        "create_group",
        "delete_group",
        "save_checkpoints",
        "save_attempts",
        "forget_attempts",
        "park",
        "unpark",
        "replay_parked",
    }
)
_LEASES = frozenset({"register", "round", "leave", "snapshot"})
_REPLICA_CALLS = frozenset({"register", "round"})
"""Lease calls whose second argument names the calling worker's replica."""


class Worker(Protocol):
    """A worker's connection to the hub, as the host sees it."""

    replicas: set[str]
    """The worker's replica ids (one per process; its lease calls name them)."""

    @property
    def connected(self) -> bool: ...


class GroupsHost:
    """The supervisor's side: ``records`` is its group store on the SQLite file."""

    def __init__(self, records: ConsumerGroupStore, leases: MemoryLeases | None = None) -> None:
        self._records = records
        self._leases = leases or MemoryLeases()
        self.on_deleted: Callable[[str, dt.datetime], None] | None = None
        """Called with a deleted group's name and creation time (the hub tells workers)."""

    async def call(self, call: GroupCall, worker: Worker) -> Any:
        """Run ``call`` for ``worker``."""
        if call.method == "delete_group":
            return await self._delete(*call.args)
        if call.method in _WRITES:
            return await getattr(self._records, call.method)(*call.args)
        if call.method in _LEASES:
            if not worker.connected:
                # Its worker died after sending it: what it was forgotten must not
                # come back (its leases would hold the partitions until they expire).
                raise StoreUnavailableError("the worker is gone")
            if call.method in _REPLICA_CALLS:
                worker.replicas.add(call.args[1])
            return await getattr(self._leases, call.method)(*call.args)
        raise ValueError(f"no such consumer-group call: {call.method!r}")

    async def _delete(self, name: str) -> bool:
        # The record read first is the one deleted: no group of that name can be created
        # while it exists, and a delete racing this one finds nothing to delete.
        record = await self._records.get_group(name)
        deleted = await self._records.delete_group(name)
        if deleted and record is not None and self.on_deleted is not None:
            self.on_deleted(name, record.created_at)
        return deleted

    def forget(self, replicas: Iterable[str]) -> None:
        """A worker is gone: its members leave, its partitions are free."""
        self._leases.forget(replicas)

    async def close(self) -> None:
        await self._records.close()


class Caller(Protocol):
    """The worker's connection to the supervisor (``hub_client.HubClient``)."""

    async def call(self, method: str, *args: Any) -> Any: ...


class WorkerGroupStore:
    """A worker's ``ConsumerGroupStore`` on SQLite: reads from the file (``reads``, its
    own connection), writes through the supervisor; leases from the supervisor."""

    def __init__(self, reads: ConsumerGroupStore, supervisor: Caller) -> None:
        self._reads = reads
        self._supervisor = supervisor

    async def create_group(self, record: GroupRecord) -> GroupRecord:
        return cast(GroupRecord, await self._supervisor.call("create_group", record))

    async def get_group(self, name: str) -> GroupRecord | None:
        return await self._reads.get_group(name)

    async def list_groups(self) -> list[GroupRecord]:
        return await self._reads.list_groups()

    async def delete_group(self, name: str) -> bool:
        return cast(bool, await self._supervisor.call("delete_group", name))

    async def load_checkpoints(self, name: str) -> dict[int, int]:
        return await self._reads.load_checkpoints(name)

    async def save_checkpoints(self, group: GroupRecord, checkpoints: Mapping[int, int]) -> None:
        await self._supervisor.call("save_checkpoints", group, dict(checkpoints))

    async def save_attempts(self, group: GroupRecord, attempts: Sequence[FailedAttempts]) -> None:
        await self._supervisor.call("save_attempts", group, list(attempts))

    async def forget_attempts(self, group: GroupRecord, event_ids: Sequence[str]) -> None:
        await self._supervisor.call("forget_attempts", group, list(event_ids))

    async def load_attempts(self, name: str, partitions: Collection[int]) -> list[FailedAttempts]:
        return await self._reads.load_attempts(name, partitions)

    async def park(self, group: GroupRecord, events: Sequence[ParkedEvent]) -> None:
        await self._supervisor.call("park", group, list(events))

    async def unpark(self, group: GroupRecord, event_ids: Sequence[str]) -> None:
        await self._supervisor.call("unpark", group, list(event_ids))

    async def replay_parked(self, name: str, limit: int) -> int:
        return cast(int, await self._supervisor.call("replay_parked", name, limit))

    async def replaying(self, name: str, limit: int) -> list[ParkedEvent]:
        return await self._reads.replaying(name, limit)

    async def parked_after(self, name: str, after: Mapping[int, int]) -> list[tuple[int, str]]:
        return await self._reads.parked_after(name, after)

    async def parked_count(self, name: str) -> int:
        return await self._reads.parked_count(name)

    async def lowest_replaying(self, name: str) -> dict[int, int]:
        return await self._reads.lowest_replaying(name)

    def partition_leases(self) -> LeaseStore:
        """Members on every worker share each group's partitions."""
        return SupervisorLeases(self._supervisor)

    async def close(self) -> None:
        await self._reads.close()


class SupervisorLeases:
    """``leases.LeaseStore`` kept by the supervisor (``GroupsHost``)."""

    def __init__(self, supervisor: Caller) -> None:
        self._supervisor = supervisor
        self.ttl = LEASE_TTL

    async def register(self, group: str, replica_id: str, member: LocalMember) -> None:
        await self._supervisor.call("register", group, replica_id, member)

    async def round(
        self,
        group: str,
        replica_id: str,
        members: Sequence[LocalMember],
        release: Sequence[int],
        claims: Mapping[int, str],
        in_flight: Mapping[int, int] | None = None,
        created_at: dt.datetime | None = None,
    ) -> tuple[list[LiveMember], dict[int, str], set[int]]:
        # ``created_at`` stays here: the supervisor tells every worker of a deletion.
        answer = await self._supervisor.call(
            "round",
            group,
            replica_id,
            list(members),
            list(release),
            dict(claims),
            dict(in_flight or {}),
        )
        return cast(tuple[list[LiveMember], dict[int, str], set[int]], answer)

    async def leave(self, group: str, replica_id: str) -> None:
        await self._supervisor.call("leave", group, replica_id)

    async def snapshot(self, group: str) -> tuple[list[LiveMember], dict[int, PartitionLease]]:
        answer = await self._supervisor.call("snapshot", group)
        return cast(tuple[list[LiveMember], dict[int, PartitionLease]], answer)
