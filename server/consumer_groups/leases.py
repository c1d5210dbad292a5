"""Partition ownership across replicas, arbitrated by PostgreSQL (schema migration 4).

Every replica with members of a group runs a ``LeaseCoordinator`` for it. Each round
(every ``interval`` seconds, and at once when a local member joins or leaves) it

1. heartbeats its members (rows that expire after ``ttl`` unless renewed),
2. reads the live members of every replica and the valid partition leases,
3. computes the same balanced plan every replica computes from that data
   (``balance.assign``: counts differ by at most one, fewest moves),
4. gives up the partitions the plan moves away from its members (their checkpoints are
   stored first), and claims or renews those the plan gives them. A claim succeeds only
   on a free or expired lease, or one this replica holds: two replicas can never hold one
   partition at once, whatever their plans say at a given moment.

A replica delivers a partition only while its lease is valid by its own clock: the local
deadline is taken from before the renewal was sent, so it always ends before the one in
the database. A replica that dies or loses the database stops renewing; its members and
leases expire after ``ttl`` and the others take its partitions over in the next round:
within ``ttl + interval`` (12 s with the defaults; the contract allows 15 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from server.consumer_groups import balance
from server.consumer_groups.model import MemberIdTakenError
from server.stores.postgres_errors import store_error

log = logging.getLogger("order_gateway.consumer_groups")

Pool = AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]]

LEASE_TTL = 10.0
"""Seconds a member row or a partition lease lives without renewal."""
ROUND_INTERVAL = 2.0
"""Seconds between a coordinator's rounds."""


@dataclass(frozen=True, slots=True)
class LiveMember:
    member_id: str
    replica_id: str
    user_id: str
    joined_at: dt.datetime
    in_flight: int


@dataclass(frozen=True, slots=True)
class LocalMember:
    member_id: str
    user_id: str
    joined_at: dt.datetime
    in_flight: int


@contextmanager
def _translated(operation: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as e:
        raise store_error(e, operation) from e


class PostgresLeases:
    """The members and leases tables of one database."""

    def __init__(self, pool: Pool, ttl: float = LEASE_TTL) -> None:
        self._pool = pool
        self.ttl = ttl

    async def register(self, group: str, replica_id: str, member: LocalMember) -> None:
        """Add a member, or raise MemberIdTakenError while another live one has its id."""
        with _translated("consumer group members"):
            async with self._pool.connection() as conn:
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
                    " RETURNING member_id",
                    (group, member.member_id, replica_id, member.user_id, member.joined_at, self.ttl),
                )
                if await cursor.fetchone() is None:
                    raise MemberIdTakenError(group, member.member_id)

    async def round(
        self,
        group: str,
        replica_id: str,
        members: Sequence[LocalMember],
        release: Sequence[int],
        claims: Mapping[int, str],
    ) -> tuple[list[LiveMember], dict[int, str], set[int]]:
        """One transaction: heartbeat ``members`` (forgetting this replica's others),
        release partitions, claim or renew ``claims`` (partition: member id).

        Returns the live members (join order), the valid leases (partition: member id)
        and the partitions this replica holds after the claims.
        """
        with _translated("consumer group leases"):
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(
                    "DELETE FROM consumer_group_members WHERE group_name = %s"
                    " AND replica_id = %s AND NOT member_id = ANY(%s)",
                    (group, replica_id, [m.member_id for m in members]),
                )
                if members:
                    await conn.execute(
                        "UPDATE consumer_group_members m SET in_flight = u.in_flight,"
                        " expires_at = now() + make_interval(secs => %s)"
                        " FROM unnest(%s::text[], %s::integer[]) AS u(member_id, in_flight)"
                        " WHERE m.group_name = %s AND m.replica_id = %s"
                        " AND m.member_id = u.member_id",
                        (
                            self.ttl,
                            [m.member_id for m in members],
                            [m.in_flight for m in members],
                            group,
                            replica_id,
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
                        " (group_name, partition, member_id, replica_id, expires_at)"
                        " SELECT %s, c.partition, c.member_id, %s,"
                        " now() + make_interval(secs => %s)"
                        " FROM unnest(%s::integer[], %s::text[]) AS c(partition, member_id)"
                        " ON CONFLICT (group_name, partition) DO UPDATE SET"
                        " member_id = excluded.member_id, replica_id = excluded.replica_id,"
                        " expires_at = excluded.expires_at"
                        " WHERE consumer_group_leases.expires_at < now()"
                        " OR consumer_group_leases.replica_id = excluded.replica_id"
                        " RETURNING partition",
                        (group, replica_id, self.ttl, list(claims), list(claims.values())),
                    )
                    held = {int(row[0]) for row in await cursor.fetchall()}
                cursor = await conn.execute(
                    "SELECT member_id, replica_id, user_id, joined_at, in_flight"
                    " FROM consumer_group_members WHERE group_name = %s AND expires_at > now()"
                    " ORDER BY joined_at, member_id",
                    (group,),
                )
                live = [
                    LiveMember(m, r, u, j.astimezone(dt.UTC), int(n))
                    for m, r, u, j, n in await cursor.fetchall()
                ]
                cursor = await conn.execute(
                    "SELECT partition, member_id FROM consumer_group_leases"
                    " WHERE group_name = %s AND expires_at > now()",
                    (group,),
                )
                leases = {int(p): m for p, m in await cursor.fetchall()}
        return live, leases, held

    async def leave(self, group: str, replica_id: str) -> None:
        """This replica has no member in the group any more: free what it holds."""
        with _translated("consumer group leases"):
            async with self._pool.connection() as conn, conn.transaction():
                for table in ("consumer_group_leases", "consumer_group_members"):
                    await conn.execute(
                        f"DELETE FROM {table} WHERE group_name = %s AND replica_id = %s",
                        (group, replica_id),
                    )

    async def snapshot(self, group: str) -> tuple[list[LiveMember], dict[int, str]]:
        """Live members and valid leases, for GetConsumerGroup."""
        live, leases, _ = await self.round(group, "", [], [], {})
        return live, leases


class LeaseCoordinator:
    """Keeps a runtime's partition ownership in step with the leases (see the module doc).

    ``apply(owned)`` is called with the partitions this replica may deliver, each with its
    local member id; ``release(partitions)`` before giving partitions up (it stores their
    checkpoints); ``local_members()`` lists this replica's members.
    """

    def __init__(
        self,
        leases: PostgresLeases,
        group: str,
        replica_id: str,
        partitions: int,
        local_members: Callable[[], list[LocalMember]],
        apply: Callable[[dict[int, str]], Any],
        release: Callable[[set[int]], Any],
        interval: float = ROUND_INTERVAL,
    ) -> None:
        self._leases = leases
        self._group = group
        self._replica_id = replica_id
        self._partitions = partitions
        self._local_members = local_members
        self._apply = apply
        self._release = release
        self._interval = interval
        self._wake = asyncio.Event()
        self._held: dict[int, str] = {}
        self._valid_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self.live: list[LiveMember] = []
        self.leases: dict[int, str] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"group-leases-{self._group}")

    def nudge(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self._leases.leave(self._group, self._replica_id)
        except Exception:
            log.exception("consumer group %r: releasing leases failed", self._group)

    async def _run(self) -> None:
        while True:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("consumer group %r: lease round failed", self._group)
            self._check_expiry()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()

    def _check_expiry(self) -> None:
        # Renewals failed for longer than the lease lives: deliver nothing any more.
        if self._held and time.monotonic() >= self._valid_until:
            log.warning("consumer group %r: leases expired unrenewed", self._group)
            self._held = {}
            self._apply({})

    async def _round(self) -> None:
        members = self._local_members()
        local_ids = {m.member_id for m in members}
        # First, from what was known, what this replica must give up: its checkpoints
        # are stored before the lease is, so the next owner resumes from them.
        plan = self._plan(self.live, self.leases) if self.live else {}
        giving_up = {
            p for p, m in self._held.items() if plan.get(p, m) != m or m not in local_ids
        }
        if giving_up:
            self._held = {p: m for p, m in self._held.items() if p not in giving_up}
            self._apply(dict(self._held))
            await self._release(giving_up)
        claims = {p: m for p, m in plan.items() if m in local_ids}
        claims.update({p: m for p, m in self._held.items() if p not in claims})
        started = time.monotonic()
        live, leases, held = await self._leases.round(
            self._group, self._replica_id, members, sorted(giving_up), claims
        )
        self.live, self.leases = live, leases
        self._valid_until = started + self._leases.ttl - 1.0
        self._held = {p: claims[p] for p in held}
        self._apply(dict(self._held))
        if self._plan(live, leases) != plan:
            # The plan changed with what this round learnt: act on it now, not later.
            self._wake.set()

    def _plan(self, live: list[LiveMember], leases: dict[int, str]) -> dict[int, str]:
        ids = [m.member_id for m in live]
        current: dict[str, list[int]] = {}
        for partition, member_id in leases.items():
            current.setdefault(member_id, []).append(partition)
        assigned = balance.assign(current, ids, self._partitions)
        return {p: m for m, ps in assigned.items() for p in ps}
