"""Consumer-group records in PostgreSQL (tables of schema migration 3), shared by every
replica. Uses the event store's connection pool; every statement is one transaction."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from server.consumer_groups.model import GroupRecord, ParkedEvent
from server.consumer_groups.records import settings_fields, settings_from
from server.stores.postgres_errors import store_error

Pool = AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]]

_GROUP_COLUMNS = "name, settings, created_at, start_position"
_PARKED_COLUMNS = "event_id, position, partition, reason, parked_at, replaying"
_OLDEST_FIRST = "ORDER BY parked_at, position"


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


class PostgresConsumerGroupStore:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def _rows(self, query: str, params: Sequence[Any] = ()) -> list[TupleRow]:
        with _translated("consumer groups"):
            async with self._pool.connection() as conn:
                cursor = await conn.execute(query, params)
                return await cursor.fetchall() if cursor.description else []

    async def create_group(self, record: GroupRecord) -> GroupRecord:
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
        return _group(rows[0])

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

    async def save_checkpoints(self, name: str, checkpoints: Mapping[int, int]) -> None:
        # One statement; the join drops a deleted group's checkpoints instead of failing.
        await self._rows(
            "INSERT INTO consumer_group_checkpoints (group_name, partition, position)"
            " SELECT g.name, c.partition, c.position FROM consumer_groups g,"
            " unnest(%s::integer[], %s::bigint[]) AS c(partition, position)"
            " WHERE g.name = %s"
            " ON CONFLICT (group_name, partition) DO UPDATE"
            " SET position = greatest(consumer_group_checkpoints.position, excluded.position)",
            (list(checkpoints), list(checkpoints.values()), name),
        )

    async def park(self, name: str, events: Sequence[ParkedEvent]) -> None:
        await self._rows(
            f"INSERT INTO consumer_group_parked (group_name, {_PARKED_COLUMNS})"
            " SELECT g.name, p.event_id, p.position, p.partition, p.reason, p.parked_at, false"
            " FROM consumer_groups g, unnest(%s::text[], %s::bigint[], %s::integer[],"
            " %s::text[], %s::timestamptz[])"
            " AS p(event_id, position, partition, reason, parked_at)"
            " WHERE g.name = %s"
            " ON CONFLICT (group_name, event_id) DO UPDATE SET reason = excluded.reason,"
            " parked_at = excluded.parked_at, replaying = false",
            (
                [e.event_id for e in events],
                [e.position for e in events],
                [e.partition for e in events],
                [e.reason for e in events],
                [e.parked_at for e in events],
                name,
            ),
        )

    async def unpark(self, name: str, event_ids: Sequence[str]) -> None:
        await self._rows(
            "DELETE FROM consumer_group_parked WHERE group_name = %s AND event_id = ANY(%s)",
            (name, list(event_ids)),
        )

    async def replay_parked(self, name: str, limit: int) -> list[ParkedEvent]:
        rows = await self._rows(
            "UPDATE consumer_group_parked SET replaying = true"
            " WHERE (group_name, event_id) IN ("
            " SELECT group_name, event_id FROM consumer_group_parked"
            f" WHERE group_name = %s AND NOT replaying {_OLDEST_FIRST} LIMIT %s"
            " FOR UPDATE SKIP LOCKED)"
            f" RETURNING {_PARKED_COLUMNS}",
            (name, limit or None),
        )
        return sorted((_parked(row) for row in rows), key=lambda e: (e.parked_at, e.position))

    async def replaying(self, name: str) -> list[ParkedEvent]:
        rows = await self._rows(
            f"SELECT {_PARKED_COLUMNS} FROM consumer_group_parked"
            f" WHERE group_name = %s AND replaying {_OLDEST_FIRST}",
            (name,),
        )
        return [_parked(row) for row in rows]

    async def parked_count(self, name: str) -> int:
        rows = await self._rows(
            "SELECT count(*) FROM consumer_group_parked WHERE group_name = %s AND NOT replaying",
            (name,),
        )
        return int(rows[0][0])

    async def close(self) -> None:
        """The pool belongs to the event store, which closes it."""
        return None
