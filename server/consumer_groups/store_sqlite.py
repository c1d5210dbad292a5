"""Consumer-group records in the SQLite store's file (tables of schema migrations 4, 5).

A connection of its own, used by one thread at a time (under a lock): group writes are few (a
checkpoint a second per group while it moves, parked events, failed attempts) and each is
its own short ``BEGIN IMMEDIATE`` transaction, which takes turns with the event writer's
batches on SQLite's one write lock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Final, TypeVar

from server.consumer_groups.model import FailedAttempts, GroupRecord, ParkedEvent
from server.consumer_groups.records import settings_from, settings_json
from server.stores.sqlite_errors import store_error

T = TypeVar("T")

EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MICROSECOND: Final = dt.timedelta(microseconds=1)
BUSY_TIMEOUT_SECONDS: Final = 30.0

_GROUP_COLUMNS = "name, settings, created_at_us, start_position"
_PARKED_COLUMNS = "event_id, position, partition, reason, parked_at_us, replaying"
_ATTEMPTS_COLUMNS = "event_id, position, partition, attempts, retry_at_us"
_OLDEST_FIRST = "ORDER BY parked_at_us, position"
_THE_GROUP = "consumer_groups WHERE name = ? AND created_at_us = ?"
"""The group as a runtime knows it (name, creation time): none once deleted, even if
created again since."""
_FORGET_ATTEMPTS = (
    "DELETE FROM consumer_group_attempts"
    f" WHERE group_name IN (SELECT name FROM {_THE_GROUP}) AND event_id = ?"
)


def _us(moment: dt.datetime) -> int:
    return (moment - EPOCH) // MICROSECOND


def _epoch_us(seconds: float) -> int:
    return round(seconds * 1e6)


def _group(row: tuple[str, str, int, int]) -> GroupRecord:
    name, settings, created_at_us, start = row
    return GroupRecord(name, settings_from(settings), EPOCH + created_at_us * MICROSECOND, start)


def _parked(row: tuple[str, int, int, str, int, int]) -> ParkedEvent:
    event_id, position, partition, reason, parked_at_us, replaying = row
    return ParkedEvent(
        event_id, position, partition, reason, EPOCH + parked_at_us * MICROSECOND, bool(replaying)
    )


class SQLiteConsumerGroupStore:
    def __init__(self, connection: sqlite3.Connection, path: Path | None = None) -> None:
        self._connection = connection
        self._path = path
        """The store's file, to tell a write's I/O error that is a full disk or a file size
        limit from one that is not."""
        self._lock = threading.Lock()

    @classmethod
    async def open(cls, path: Path) -> SQLiteConsumerGroupStore:
        """The tables exist: the event store opened (and migrated) the file first."""

        def connect() -> sqlite3.Connection:
            connection = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA foreign_keys = ON")
            connection.execute("PRAGMA synchronous = FULL")
            return connection

        return cls(await asyncio.to_thread(connect), path)

    async def _run(self, work: Callable[[sqlite3.Connection], T], write: bool = False) -> T:
        def run() -> T:
            # A thread lock, held in the thread: a caller cancelled while it waits (a
            # shutdown) must not let the next one, or close(), use the connection while
            # this statement still runs on it (that crashed the process).
            with self._lock:
                connection = self._connection
                if not write:
                    return work(connection)
                connection.execute("BEGIN IMMEDIATE")
                try:
                    result = work(connection)
                    connection.execute("COMMIT")
                except BaseException:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    raise
                return result

        try:
            return await asyncio.to_thread(run)
        except sqlite3.Error as e:
            # As the event store's own errors: a full disk is STORE_FULL and a file that
            # cannot be used right now STORE_UNAVAILABLE, not INTERNAL.
            raise store_error(f"consumer group storage failed: {e}", e, self._path) from e

    async def create_group(self, record: GroupRecord) -> GroupRecord:
        def work(c: sqlite3.Connection) -> GroupRecord:
            c.execute(
                f"INSERT INTO consumer_groups ({_GROUP_COLUMNS}) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO NOTHING",
                (
                    record.name,
                    settings_json(record.settings),
                    _us(record.created_at),
                    record.start_position,
                ),
            )
            row = c.execute(
                f"SELECT {_GROUP_COLUMNS} FROM consumer_groups WHERE name = ?", (record.name,)
            ).fetchone()
            return _group(row)

        return await self._run(work, write=True)

    async def get_group(self, name: str) -> GroupRecord | None:
        def work(c: sqlite3.Connection) -> GroupRecord | None:
            row = c.execute(
                f"SELECT {_GROUP_COLUMNS} FROM consumer_groups WHERE name = ?", (name,)
            ).fetchone()
            return None if row is None else _group(row)

        return await self._run(work)

    async def list_groups(self) -> list[GroupRecord]:
        def work(c: sqlite3.Connection) -> list[GroupRecord]:
            rows = c.execute(
                f"SELECT {_GROUP_COLUMNS} FROM consumer_groups ORDER BY name"
            ).fetchall()
            return [_group(row) for row in rows]

        return await self._run(work)

    async def delete_group(self, name: str) -> bool:
        def work(c: sqlite3.Connection) -> bool:
            return c.execute("DELETE FROM consumer_groups WHERE name = ?", (name,)).rowcount > 0

        return await self._run(work, write=True)

    async def load_checkpoints(self, name: str) -> dict[int, int]:
        def work(c: sqlite3.Connection) -> dict[int, int]:
            rows = c.execute(
                "SELECT partition, position FROM consumer_group_checkpoints WHERE group_name = ?",
                (name,),
            ).fetchall()
            return {int(partition): int(position) for partition, position in rows}

        return await self._run(work)

    async def save_checkpoints(self, group: GroupRecord, checkpoints: Mapping[int, int]) -> None:
        key = (group.name, _us(group.created_at))

        def work(c: sqlite3.Connection) -> None:
            # INSERT … SELECT so that a deleted group's checkpoints are not written back, nor
            # written into a group created again under its name.
            c.executemany(
                "INSERT INTO consumer_group_checkpoints (group_name, partition, position)"
                f" SELECT name, ?, ? FROM {_THE_GROUP}"
                " ON CONFLICT (group_name, partition)"
                " DO UPDATE SET position = max(position, excluded.position)",
                [(partition, position, *key) for partition, position in checkpoints.items()],
            )

        await self._run(work, write=True)

    async def save_attempts(self, group: GroupRecord, attempts: Sequence[FailedAttempts]) -> None:
        key = (group.name, _us(group.created_at))

        def work(c: sqlite3.Connection) -> None:
            # INSERT … SELECT so that a deleted group's counts are not written back, nor
            # written into a group created again under its name.
            c.executemany(
                f"INSERT INTO consumer_group_attempts (group_name, {_ATTEMPTS_COLUMNS})"
                f" SELECT name, ?, ?, ?, ?, ? FROM {_THE_GROUP}"
                " ON CONFLICT (group_name, event_id) DO UPDATE"
                # The latest failure's wait goes with its count.
                " SET retry_at_us = CASE WHEN excluded.attempts >= attempts"
                " THEN excluded.retry_at_us ELSE retry_at_us END,"
                " attempts = max(attempts, excluded.attempts)",
                [
                    (a.event_id, a.position, a.partition, a.attempts, _epoch_us(a.retry_at), *key)
                    for a in attempts
                ],
            )

        await self._run(work, write=True)

    async def forget_attempts(self, group: GroupRecord, event_ids: Sequence[str]) -> None:
        key = (group.name, _us(group.created_at))

        def work(c: sqlite3.Connection) -> None:
            c.executemany(_FORGET_ATTEMPTS, [(*key, event_id) for event_id in event_ids])

        await self._run(work, write=True)

    async def load_attempts(self, name: str, partitions: Collection[int]) -> list[FailedAttempts]:
        wanted = list(partitions)

        def work(c: sqlite3.Connection) -> list[FailedAttempts]:
            # At most 256 partitions: one placeholder each stays far below SQLite's limit.
            rows = c.execute(
                f"SELECT {_ATTEMPTS_COLUMNS} FROM consumer_group_attempts"
                f" WHERE group_name = ? AND partition IN ({', '.join('?' * len(wanted))})",
                (name, *wanted),
            ).fetchall()
            return [
                FailedAttempts(event_id, position, partition, attempts, retry_at_us / 1e6)
                for event_id, position, partition, attempts, retry_at_us in rows
            ]

        return await self._run(work)

    async def park(self, group: GroupRecord, events: Sequence[ParkedEvent]) -> None:
        key = (group.name, _us(group.created_at))

        def work(c: sqlite3.Connection) -> None:
            c.executemany(
                f"INSERT INTO consumer_group_parked (group_name, {_PARKED_COLUMNS})"
                f" SELECT name, ?, ?, ?, ?, ?, 0 FROM {_THE_GROUP}"
                " ON CONFLICT (group_name, event_id) DO UPDATE SET"
                " reason = excluded.reason, parked_at_us = excluded.parked_at_us, replaying = 0",
                [
                    (e.event_id, e.position, e.partition, e.reason, _us(e.parked_at), *key)
                    for e in events
                ],
            )
            c.executemany(_FORGET_ATTEMPTS, [(*key, e.event_id) for e in events])

        await self._run(work, write=True)

    async def unpark(self, group: GroupRecord, event_ids: Sequence[str]) -> None:
        keys = [(group.name, _us(group.created_at), event_id) for event_id in event_ids]

        def work(c: sqlite3.Connection) -> None:
            c.executemany(
                "DELETE FROM consumer_group_parked"
                f" WHERE group_name IN (SELECT name FROM {_THE_GROUP}) AND event_id = ?",
                keys,
            )
            c.executemany(_FORGET_ATTEMPTS, keys)

        await self._run(work, write=True)

    async def replay_parked(self, name: str, limit: int) -> int:
        def work(c: sqlite3.Connection) -> int:
            # One statement each, in one transaction: a replay of a million parked events
            # reads none into memory. Parking forgot the events' counts, but one written
            # late (by a process its partition had moved away from) may outlive the park;
            # it goes first, while the chosen events are still the ones not replaying.
            chosen = (
                "SELECT event_id FROM consumer_group_parked"
                f" WHERE group_name = ? AND replaying = 0 {_OLDEST_FIRST} LIMIT ?"
            )
            c.execute(
                "DELETE FROM consumer_group_attempts"
                f" WHERE group_name = ? AND event_id IN ({chosen})",
                (name, name, limit or -1),
            )
            return c.execute(
                "UPDATE consumer_group_parked SET replaying = 1"
                f" WHERE group_name = ? AND event_id IN ({chosen})",
                (name, name, limit or -1),
            ).rowcount

        return await self._run(work, write=True)

    async def replaying(self, name: str, limit: int) -> list[ParkedEvent]:
        def work(c: sqlite3.Connection) -> list[ParkedEvent]:
            rows = c.execute(
                f"SELECT {_PARKED_COLUMNS} FROM consumer_group_parked"
                f" WHERE group_name = ? AND replaying = 1 {_OLDEST_FIRST} LIMIT ?",
                (name, limit),
            ).fetchall()
            return [_parked(row) for row in rows]

        return await self._run(work)

    async def lowest_replaying(self, name: str) -> dict[int, int]:
        def work(c: sqlite3.Connection) -> dict[int, int]:
            rows = c.execute(
                "SELECT partition, min(position) FROM consumer_group_parked"
                " WHERE group_name = ? AND replaying = 1 GROUP BY partition",
                (name,),
            ).fetchall()
            return {int(partition): int(position) for partition, position in rows}

        return await self._run(work)

    async def parked_after(self, name: str, after: Mapping[int, int]) -> list[tuple[int, str]]:
        if not after:
            return []

        def work(c: sqlite3.Connection) -> list[tuple[int, str]]:
            rows = c.execute(
                "SELECT partition, position, event_id FROM consumer_group_parked"
                " WHERE group_name = ? AND position > ?",
                (name, min(after.values())),
            ).fetchall()
            return [
                (int(partition), str(event_id))
                for partition, position, event_id in rows
                if partition in after and position > after[partition]
            ]

        return await self._run(work)

    async def parked_count(self, name: str) -> int:
        def work(c: sqlite3.Connection) -> int:
            (count,) = c.execute(
                "SELECT count(*) FROM consumer_group_parked WHERE group_name = ? AND replaying = 0",
                (name,),
            ).fetchone()
            return int(count)

        return await self._run(work)

    async def close(self) -> None:
        def close() -> None:
            with self._lock:
                self._connection.close()

        await asyncio.to_thread(close)
