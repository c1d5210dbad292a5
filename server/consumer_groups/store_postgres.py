"""Consumer-group records in PostgreSQL (tables of schema migrations 6 and 9), shared by
every replica. Uses the event store's connection pool; every statement is one transaction."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import weakref
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from domain.errors import StoreUnavailableError
from server.consumer_groups.leases import (
    LEASE_TTL,
    GroupGoneError,
    LiveMember,
    LocalMember,
    PartitionLease,
)
from server.consumer_groups.model import (
    FailedAttempts,
    GroupNotFoundError,
    GroupRecord,
    MemberIdTakenError,
    ParkedEvent,
)
from server.consumer_groups.records import settings_fields, settings_from
from server.stores.postgres_errors import store_error

Pool = AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]]

CREATE_ATTEMPTS: Final = 5
"""Statements a create runs while groups of its name keep being created and deleted
around it (each statement either adds the group or reads the one there)."""

_GROUP_COLUMNS = "name, settings, created_at, start_position"
_PARKED_COLUMNS = "event_id, position, partition, reason, parked_at, replaying"
_ATTEMPTS_COLUMNS = "event_id, position, partition, attempts, retry_at"
_OLDEST_FIRST = "ORDER BY parked_at, position"
_THE_GROUP = "g.name = %s AND g.created_at = %s"
"""The group as a runtime knows it (name, creation time), as ``consumer_groups g``: none
once deleted, even if created again since."""
_FORGET = (
    "DELETE FROM consumer_group_attempts a USING consumer_groups g"
    f" WHERE {_THE_GROUP} AND a.group_name = g.name AND a.event_id = ANY(%s)"
)
_FORGET_ATTEMPTS = f"forgotten AS ({_FORGET})"
"""A data-modifying ``WITH`` query: runs with the statement it heads, in its transaction."""
_HOLDING_THE_GROUP = " FOR KEY SHARE OF g"
"""Ends an ``INSERT … SELECT … FROM consumer_groups g``: the group's row found is held until
the insert commits, so a deletion committed meanwhile drops the rows (the row is skipped)
instead of their foreign key finding a group created since under the name."""


def _group(row: Sequence[Any]) -> GroupRecord:
    name, settings, created_at, start = row
    return GroupRecord(name, settings_from(settings), created_at.astimezone(dt.UTC), int(start))


def _parked(row: Sequence[Any]) -> ParkedEvent:
    event_id, position, partition, reason, parked_at, replaying = row
    return ParkedEvent(
        event_id, int(position), int(partition), reason, parked_at.astimezone(dt.UTC), replaying
    )


@contextmanager
def _translated(operation: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as e:
        raise store_error(e, operation) from e


@contextmanager
def _group_gone_as(error: Exception) -> Iterator[None]:
    """A row added for a group that was deleted meanwhile fails its foreign key: that is
    ``error``, not a fault of the store."""
    try:
        yield
    except psycopg.errors.ForeignKeyViolation as e:
        raise error from e


class PostgresConsumerGroupStore:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def _rows(self, query: str, params: Sequence[Any] = ()) -> list[TupleRow]:
        with _translated("consumer groups"):
            async with self._pool.connection() as conn:
                cursor = await conn.execute(query, params)
                return await cursor.fetchall() if cursor.description else []

    async def create_group(self, record: GroupRecord) -> GroupRecord:
        for _ in range(CREATE_ATTEMPTS):
            rows = await self._rows(
                f"WITH added AS (INSERT INTO consumer_groups ({_GROUP_COLUMNS})"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (name) DO NOTHING"
                f" RETURNING {_GROUP_COLUMNS})"
                f" SELECT {_GROUP_COLUMNS} FROM added UNION ALL"
                f" SELECT {_GROUP_COLUMNS} FROM consumer_groups WHERE name = %s",
                (
                    record.name,
                    Jsonb(settings_fields(record.settings)),
                    record.created_at,
                    record.start_position,
                    record.name,
                ),
            )
            if rows:
                return _group(rows[0])
            # The insert met a group of that name that its statement's snapshot, taken
            # before, cannot read: created since (by another create), or deleted since.
            # The next statement's snapshot sees which.
        raise StoreUnavailableError(
            f"consumer group {record.name!r} was created and deleted elsewhere"
            f" {CREATE_ATTEMPTS} times while this create ran; try again"
        )

    async def get_group(self, name: str) -> GroupRecord | None:
        rows = await self._rows(
            f"SELECT {_GROUP_COLUMNS} FROM consumer_groups WHERE name = %s", (name,)
        )
        return _group(rows[0]) if rows else None

    async def list_groups(self) -> list[GroupRecord]:
        rows = await self._rows(f"SELECT {_GROUP_COLUMNS} FROM consumer_groups ORDER BY name")
        return [_group(row) for row in rows]

    async def delete_group(self, name: str) -> bool:
        rows = await self._rows(
            "DELETE FROM consumer_groups WHERE name = %s RETURNING name", (name,)
        )
        return bool(rows)

    async def load_checkpoints(self, name: str) -> dict[int, int]:
        rows = await self._rows(
            "SELECT partition, position FROM consumer_group_checkpoints WHERE group_name = %s",
            (name,),
        )
        return {int(partition): int(position) for partition, position in rows}

    async def save_checkpoints(self, group: GroupRecord, checkpoints: Mapping[int, int]) -> None:
        # One statement; the join drops a deleted group's checkpoints instead of failing or
        # writing them into a group created again under its name.
        await self._rows(
            "INSERT INTO consumer_group_checkpoints (group_name, partition, position)"
            " SELECT g.name, c.partition, c.position FROM consumer_groups g,"
            " unnest(%s::integer[], %s::bigint[]) AS c(partition, position)"
            f" WHERE {_THE_GROUP}{_HOLDING_THE_GROUP}"
            " ON CONFLICT (group_name, partition) DO UPDATE"
            " SET position = greatest(consumer_group_checkpoints.position, excluded.position)",
            (list(checkpoints), list(checkpoints.values()), group.name, group.created_at),
        )

    async def save_attempts(self, group: GroupRecord, attempts: Sequence[FailedAttempts]) -> None:
        # One row per event: an upsert may not touch a row twice in one statement.
        latest: dict[str, FailedAttempts] = {}
        for failed in attempts:
            before = latest.get(failed.event_id)
            if before is None or before.attempts <= failed.attempts:
                latest[failed.event_id] = failed
        rows = list(latest.values())
        # The join drops a deleted group's counts instead of failing or writing them into a
        # group created again under its name.
        await self._rows(
            f"INSERT INTO consumer_group_attempts (group_name, {_ATTEMPTS_COLUMNS})"
            " SELECT g.name, a.event_id, a.position, a.partition, a.attempts,"
            " to_timestamp(a.retry_at)"
            " FROM consumer_groups g, unnest(%s::text[], %s::bigint[], %s::integer[],"
            " %s::integer[], %s::float8[]) AS a(event_id, position, partition, attempts, retry_at)"
            f" WHERE {_THE_GROUP}{_HOLDING_THE_GROUP}"
            " ON CONFLICT (group_name, event_id) DO UPDATE"
            # The latest failure's wait goes with its count.
            " SET retry_at = CASE WHEN excluded.attempts >= consumer_group_attempts.attempts"
            " THEN excluded.retry_at ELSE consumer_group_attempts.retry_at END,"
            " attempts = greatest(consumer_group_attempts.attempts, excluded.attempts)",
            (
                [a.event_id for a in rows],
                [a.position for a in rows],
                [a.partition for a in rows],
                [a.attempts for a in rows],
                [a.retry_at for a in rows],
                group.name,
                group.created_at,
            ),
        )

    async def forget_attempts(self, group: GroupRecord, event_ids: Sequence[str]) -> None:
        await self._rows(_FORGET, (group.name, group.created_at, list(event_ids)))

    async def load_attempts(self, name: str, partitions: Collection[int]) -> list[FailedAttempts]:
        rows = await self._rows(
            f"SELECT {_ATTEMPTS_COLUMNS} FROM consumer_group_attempts"
            " WHERE group_name = %s AND partition = ANY(%s)",
            (name, list(partitions)),
        )
        return [
            FailedAttempts(
                event_id,
                int(position),
                int(partition),
                int(attempts),
                # NULL: stored by a release that kept no wait, or at once.
                retry_at.timestamp() if retry_at is not None else 0.0,
            )
            for event_id, position, partition, attempts, retry_at in rows
        ]

    async def park(self, group: GroupRecord, events: Sequence[ParkedEvent]) -> None:
        event_ids = [e.event_id for e in events]
        await self._rows(
            f"WITH {_FORGET_ATTEMPTS}"
            f" INSERT INTO consumer_group_parked (group_name, {_PARKED_COLUMNS})"
            " SELECT g.name, p.event_id, p.position, p.partition, p.reason, p.parked_at, false"
            " FROM consumer_groups g, unnest(%s::text[], %s::bigint[], %s::integer[],"
            " %s::text[], %s::timestamptz[])"
            " AS p(event_id, position, partition, reason, parked_at)"
            f" WHERE {_THE_GROUP}{_HOLDING_THE_GROUP}"
            " ON CONFLICT (group_name, event_id) DO UPDATE SET reason = excluded.reason,"
            " parked_at = excluded.parked_at, replaying = false",
            (
                group.name,
                group.created_at,
                event_ids,
                event_ids,
                [e.position for e in events],
                [e.partition for e in events],
                [e.reason for e in events],
                [e.parked_at for e in events],
                group.name,
                group.created_at,
            ),
        )

    async def unpark(self, group: GroupRecord, event_ids: Sequence[str]) -> None:
        await self._rows(
            f"WITH {_FORGET_ATTEMPTS}"
            " DELETE FROM consumer_group_parked p USING consumer_groups g"
            f" WHERE {_THE_GROUP} AND p.group_name = g.name AND p.event_id = ANY(%s)",
            (
                group.name,
                group.created_at,
                list(event_ids),
                group.name,
                group.created_at,
                list(event_ids),
            ),
        )

    async def replay_parked(self, name: str, limit: int) -> int:
        # One statement: a replay of a million parked events reads none into memory.
        # Parking forgot the events' counts, but one written late (by a replica their
        # partition had moved away from) may outlive the park: a replay starts at 1.
        rows = await self._rows(
            "WITH chosen AS (UPDATE consumer_group_parked SET replaying = true"
            " WHERE (group_name, event_id) IN ("
            " SELECT group_name, event_id FROM consumer_group_parked"
            f" WHERE group_name = %s AND NOT replaying {_OLDEST_FIRST} LIMIT %s"
            " FOR UPDATE SKIP LOCKED) RETURNING event_id),"
            " forgotten AS (DELETE FROM consumer_group_attempts a USING chosen c"
            " WHERE a.group_name = %s AND a.event_id = c.event_id)"
            " SELECT count(*) FROM chosen",
            (name, limit or None, name),
        )
        return int(rows[0][0])

    async def replaying(self, name: str, limit: int) -> list[ParkedEvent]:
        rows = await self._rows(
            f"SELECT {_PARKED_COLUMNS} FROM consumer_group_parked"
            f" WHERE group_name = %s AND replaying {_OLDEST_FIRST} LIMIT %s",
            (name, limit),
        )
        return [_parked(row) for row in rows]

    async def lowest_replaying(self, name: str) -> dict[int, int]:
        rows = await self._rows(
            "SELECT partition, min(position) FROM consumer_group_parked"
            " WHERE group_name = %s AND replaying GROUP BY partition",
            (name,),
        )
        return {int(partition): int(position) for partition, position in rows}

    async def parked_after(self, name: str, after: Mapping[int, int]) -> list[tuple[int, str]]:
        if not after:
            return []
        rows = await self._rows(
            "SELECT partition, position, event_id FROM consumer_group_parked"
            " WHERE group_name = %s AND position > %s",
            (name, min(after.values())),
        )
        return [
            (int(partition), str(event_id))
            for partition, position, event_id in rows
            if partition in after and position > after[partition]
        ]

    async def parked_count(self, name: str) -> int:
        rows = await self._rows(
            "SELECT count(*) FROM consumer_group_parked WHERE group_name = %s AND NOT replaying",
            (name,),
        )
        return int(rows[0][0])

    def partition_leases(self) -> PostgresLeases:
        """Replicas share a group's partitions through leases in this database."""
        return PostgresLeases(self._pool)

    async def close(self) -> None:
        """The pool belongs to the event store, which closes it."""
        return None


async def forget_replica(conn: psycopg.AsyncConnection[TupleRow], replica_id: str) -> None:
    """Free every member id and partition of a replica known to be dead (a worker process
    its supervisor saw exit) in every group, rather than when their leases expire: its
    consumers may rejoin under their own ids at once, on another worker."""
    async with conn.transaction():
        for table in ("consumer_group_leases", "consumer_group_members"):
            await conn.execute(f"DELETE FROM {table} WHERE replica_id = %s", (replica_id,))


class PostgresLeases:
    """``leases.LeaseStore`` in the members and leases tables (schema migrations 6, 7)."""

    def __init__(self, pool: Pool, ttl: float = LEASE_TTL) -> None:
        self._pool = pool
        self.ttl = ttl
        self._joining: dict[str, dict[str, float]] = {}
        """Per group, members registered here and not yet seen in a round's ``members``
        (member id: when): a round whose list was taken before such a member was added
        must not delete its row, or the id would be free for another join until the
        next round."""
        self._rounds: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        """Per group, held by a round and by a registration: a member's row is never
        inserted between a round's reading ``_joining`` and its deleting the rows of
        members it does not know. A lock goes once nothing holds or awaits it, and
        ``_joining`` forgets a group with nobody joining: kept per group name ever used,
        they grew for good with groups created and deleted."""

    def _round_lock(self, group: str) -> asyncio.Lock:
        lock = self._rounds.get(group)
        if lock is None:
            lock = self._rounds[group] = asyncio.Lock()
        return lock

    async def register(self, group: str, replica_id: str, member: LocalMember) -> None:
        """Add a member, or raise MemberIdTakenError while another live one has its id.

        A row of this replica's under the id is taken over: the caller registers only an
        id none of its members has, so that row's member has left and a round has not
        deleted it yet (refusing it kept a member reconnecting at once out for its TTL).
        """
        with _translated("consumer group members"), _group_gone_as(GroupNotFoundError(group)):
            async with self._round_lock(group), self._pool.connection() as conn:
                joining = self._joining.setdefault(group, {})
                before = joining.get(member.member_id)
                joining[member.member_id] = time.monotonic()
                cursor = await conn.execute(
                    "INSERT INTO consumer_group_members"
                    " (group_name, member_id, replica_id, user_id, joined_at, in_flight,"
                    " expires_at)"
                    " VALUES (%s, %s, %s, %s, %s, 0, now() + make_interval(secs => %s))"
                    " ON CONFLICT (group_name, member_id) DO UPDATE SET"
                    " replica_id = excluded.replica_id, user_id = excluded.user_id,"
                    " joined_at = excluded.joined_at, in_flight = 0,"
                    " expires_at = excluded.expires_at"
                    " WHERE consumer_group_members.expires_at < now()"
                    " OR consumer_group_members.replica_id = excluded.replica_id"
                    " RETURNING member_id",
                    (
                        group,
                        member.member_id,
                        replica_id,
                        member.user_id,
                        member.joined_at,
                        self.ttl,
                    ),
                )
                if await cursor.fetchone() is None:
                    # Not registered here: a round may delete what this id left here.
                    if before is None:
                        del joining[member.member_id]
                    else:
                        joining[member.member_id] = before
                    raise MemberIdTakenError(group, member.member_id)

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
        """One transaction: heartbeat ``members`` (forgetting this replica's others),
        release partitions, claim or renew ``claims`` (partition: member id), with each
        one's deliveries in flight.

        Returns the live members (join order), the valid leases (partition: member id)
        and the partitions this replica holds after the claims. Raises GroupGoneError
        when the group created at ``created_at`` was deleted (through any replica).
        """
        listed = [m.member_id for m in members]
        with _translated("consumer group leases"), _group_gone_as(GroupGoneError(group)):
            async with self._round_lock(group), self._pool.connection() as conn, conn.transaction():
                joining = self._joining.setdefault(group, {})
                now = time.monotonic()
                for member_id in [
                    i for i, at in joining.items() if i in listed or now - at > self.ttl
                ]:
                    del joining[member_id]
                if not joining:
                    del self._joining[group]
                if created_at is not None:
                    # The group's row is held (KEY SHARE) until the round commits: a
                    # deletion through another replica waits for it, or came first and
                    # is seen here, instead of failing the heartbeat's foreign key.
                    cursor = await conn.execute(
                        "SELECT created_at FROM consumer_groups WHERE name = %s FOR KEY SHARE",
                        (group,),
                    )
                    row = await cursor.fetchone()
                    if row is None or row[0] != created_at:
                        raise GroupGoneError(group)
                await conn.execute(
                    "DELETE FROM consumer_group_members WHERE group_name = %s"
                    " AND replica_id = %s AND NOT member_id = ANY(%s)",
                    (group, replica_id, listed + list(joining)),
                )
                if members:
                    # An upsert, not an update: a row a round removed while its member
                    # was joining comes back (never one another replica holds).
                    await conn.execute(
                        "INSERT INTO consumer_group_members (group_name, member_id,"
                        " replica_id, user_id, joined_at, in_flight, expires_at)"
                        " SELECT %s, u.member_id, %s, u.user_id, u.joined_at, u.in_flight,"
                        " now() + make_interval(secs => %s)"
                        " FROM unnest(%s::text[], %s::text[], %s::timestamptz[],"
                        " %s::integer[]) AS u(member_id, user_id, joined_at, in_flight)"
                        " ON CONFLICT (group_name, member_id) DO UPDATE SET"
                        " in_flight = excluded.in_flight, expires_at = excluded.expires_at"
                        " WHERE consumer_group_members.replica_id = excluded.replica_id",
                        (
                            group,
                            replica_id,
                            self.ttl,
                            [m.member_id for m in members],
                            [m.user_id for m in members],
                            [m.joined_at for m in members],
                            [m.in_flight for m in members],
                        ),
                    )
                await conn.execute(
                    "DELETE FROM consumer_group_leases WHERE group_name = %s"
                    " AND (replica_id = %s AND (partition = ANY(%s)"
                    " OR NOT member_id = ANY(%s)) OR expires_at < now() - interval '1 minute')",
                    (group, replica_id, list(release), [m.member_id for m in members]),
                )
                held: set[int] = set()
                if claims:
                    cursor = await conn.execute(
                        "INSERT INTO consumer_group_leases"
                        " (group_name, partition, member_id, replica_id, expires_at, in_flight)"
                        " SELECT %s, c.partition, c.member_id, %s,"
                        " now() + make_interval(secs => %s), c.in_flight"
                        " FROM unnest(%s::integer[], %s::text[], %s::integer[])"
                        " AS c(partition, member_id, in_flight)"
                        " ON CONFLICT (group_name, partition) DO UPDATE SET"
                        " member_id = excluded.member_id, replica_id = excluded.replica_id,"
                        " expires_at = excluded.expires_at, in_flight = excluded.in_flight"
                        " WHERE consumer_group_leases.expires_at < now()"
                        " OR consumer_group_leases.replica_id = excluded.replica_id"
                        " RETURNING partition",
                        (
                            group,
                            replica_id,
                            self.ttl,
                            list(claims),
                            list(claims.values()),
                            [(in_flight or {}).get(p, 0) for p in claims],
                        ),
                    )
                    held = {int(row[0]) for row in await cursor.fetchall()}
                live = await self._live(conn, group)
                leases = await self._leases(conn, group)
        return live, leases, held

    async def leave(self, group: str, replica_id: str) -> None:
        """This replica has no member in the group any more: free what it holds."""
        self._joining.pop(group, None)
        with _translated("consumer group leases"):
            async with self._pool.connection() as conn, conn.transaction():
                # The group's row first, as a deletion of the group takes it before its
                # members' and leases' rows (by cascade, members first): the other way
                # round, a leave and a deletion through another replica could each wait
                # for a row the other held, and PostgreSQL failed one of them (a
                # deadlock: the deletion answered INTERNAL).
                cursor = await conn.execute(
                    "SELECT 1 FROM consumer_groups WHERE name = %s FOR KEY SHARE", (group,)
                )
                if await cursor.fetchone() is None:
                    return  # Deleted: its members and leases went with it.
                for table in ("consumer_group_leases", "consumer_group_members"):
                    await conn.execute(
                        f"DELETE FROM {table} WHERE group_name = %s AND replica_id = %s",
                        (group, replica_id),
                    )

    async def snapshot(self, group: str) -> tuple[list[LiveMember], dict[int, PartitionLease]]:
        with _translated("consumer group leases"):
            async with self._pool.connection() as conn, conn.transaction():
                live = await self._live(conn, group)
                cursor = await conn.execute(
                    "SELECT partition, member_id, in_flight FROM consumer_group_leases"
                    " WHERE group_name = %s AND expires_at > now()",
                    (group,),
                )
                leases = {int(p): PartitionLease(m, int(n)) for p, m, n in await cursor.fetchall()}
        return live, leases

    @staticmethod
    async def _live(conn: psycopg.AsyncConnection[TupleRow], group: str) -> list[LiveMember]:
        cursor = await conn.execute(
            "SELECT member_id, replica_id, user_id, joined_at, in_flight"
            " FROM consumer_group_members WHERE group_name = %s AND expires_at > now()"
            " ORDER BY joined_at, member_id",
            (group,),
        )
        return [
            LiveMember(m, r, u, j.astimezone(dt.UTC), int(n))
            for m, r, u, j, n in await cursor.fetchall()
        ]

    @staticmethod
    async def _leases(conn: psycopg.AsyncConnection[TupleRow], group: str) -> dict[int, str]:
        cursor = await conn.execute(
            "SELECT partition, member_id FROM consumer_group_leases"
            " WHERE group_name = %s AND expires_at > now()",
            (group,),
        )
        return {int(p): m for p, m in await cursor.fetchall()}
