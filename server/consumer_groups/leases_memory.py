"""Partition leases kept in one process's memory: ``leases.LeaseStore`` for the workers of
a SQLite gateway, where the supervisor is the one place that arbitrates (it outlives
every worker, and its workers stop when it dies, so nothing needs to outlive it).

The rules are PostgreSQL's (``store_postgres.PostgresLeases``): members and leases expire
``ttl`` seconds after their last renewal, a claim succeeds only on a free or expired
lease or one the claiming replica holds, and an id is taken while its member is live.
Here a whole replica can also be forgotten at once (``forget``): a worker whose
connection to the supervisor is gone is dead, and its partitions need not wait out their
leases.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from server.consumer_groups.leases import LEASE_TTL, LiveMember, LocalMember, PartitionLease
from server.consumer_groups.model import MemberIdTakenError


@dataclass(slots=True)
class _Member:
    replica_id: str
    member: LocalMember
    expires_at: float


@dataclass(slots=True)
class _Lease:
    member_id: str
    replica_id: str
    expires_at: float
    in_flight: int = 0


@dataclass(slots=True)
class _Group:
    members: dict[str, _Member]
    leases: dict[int, _Lease]


class MemoryLeases:
    def __init__(self, ttl: float = LEASE_TTL, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self._clock = clock
        self._groups: dict[str, _Group] = {}

    def _group(self, name: str) -> _Group:
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = _Group({}, {})
        return group

    async def register(self, group: str, replica_id: str, member: LocalMember) -> None:
        members = self._group(group).members
        now = self._clock()
        found = members.get(member.member_id)
        # The replica's own entry is its departed member's (see ``LeaseStore.register``).
        if found is not None and found.expires_at >= now and found.replica_id != replica_id:
            raise MemberIdTakenError(group, member.member_id)
        members[member.member_id] = _Member(replica_id, member, now + self.ttl)

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
        # ``created_at`` goes unchecked: the supervisor tells every worker of a deletion.
        state = self._group(group)
        now = self._clock()
        expires_at = now + self.ttl
        ids = {m.member_id for m in members}
        for member_id, row in list(state.members.items()):
            if (row.replica_id == replica_id and member_id not in ids) or row.expires_at < now:
                del state.members[member_id]
        for member in members:
            found = state.members.get(member.member_id)
            if found is None or found.replica_id == replica_id:
                # Back if a round removed it while its member was joining; never one
                # another replica holds.
                state.members[member.member_id] = _Member(replica_id, member, expires_at)
        freed = set(release)
        for partition, held_by in list(state.leases.items()):
            mine = held_by.replica_id == replica_id
            gone = partition in freed or held_by.member_id not in ids
            if (mine and gone) or held_by.expires_at < now:
                del state.leases[partition]
        held: set[int] = set()
        for partition, member_id in claims.items():
            lease = state.leases.get(partition)
            if lease is None or lease.replica_id == replica_id:
                state.leases[partition] = _Lease(
                    member_id, replica_id, expires_at, (in_flight or {}).get(partition, 0)
                )
                held.add(partition)
        owners = {p: lease.member_id for p, lease in self._valid(state, now).items()}
        return self._live(state, now), owners, held

    async def leave(self, group: str, replica_id: str) -> None:
        self.forget([replica_id], groups=[group])

    async def snapshot(self, group: str) -> tuple[list[LiveMember], dict[int, PartitionLease]]:
        state = self._groups.get(group)
        if state is None:
            return [], {}
        now = self._clock()
        leases = {
            p: PartitionLease(lease.member_id, lease.in_flight)
            for p, lease in self._valid(state, now).items()
        }
        return self._live(state, now), leases

    def forget(self, replica_ids: Iterable[str], groups: Iterable[str] | None = None) -> None:
        """Drop these replicas' members and leases (in ``groups``, or in every group)."""
        gone = set(replica_ids)
        for name in list(self._groups if groups is None else groups):
            state = self._groups.get(name)
            if state is None:
                continue
            for member_id, member in list(state.members.items()):
                if member.replica_id in gone:
                    del state.members[member_id]
            for partition, lease in list(state.leases.items()):
                if lease.replica_id in gone:
                    del state.leases[partition]
            if not state.members and not state.leases:
                del self._groups[name]

    @staticmethod
    def _live(state: _Group, now: float) -> list[LiveMember]:
        live = [
            LiveMember(
                m.member.member_id,
                m.replica_id,
                m.member.user_id,
                m.member.joined_at,
                m.member.in_flight,
            )
            for m in state.members.values()
            if m.expires_at >= now
        ]
        return sorted(live, key=lambda m: (m.joined_at, m.member_id))

    @staticmethod
    def _valid(state: _Group, now: float) -> dict[int, _Lease]:
        return {p: lease for p, lease in state.leases.items() if lease.expires_at >= now}
