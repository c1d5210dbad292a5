"""The PostgreSQL event store, for several gateway replicas sharing one database.

Appends go through ``og_append`` (``postgres_schema``): one statement, in autocommit mode its
own transaction, so an append costs one round trip and returns only once committed. That
function takes the lock that makes positions visible in commit order; its comment explains
the choice and its cost.

Group commit: appends made concurrently in one process share a statement and a commit.
A writer task sends what is waiting (up to ``max_batch`` commits, and only up to the first
that shares a stream or command_id with an earlier one or with a batch in flight) and, while
that batch commits, the next one gathers. Each commit still succeeds or fails on its own.
Up to ``max_in_flight`` batches are in flight at once, on their own connections: the lock
runs them one after the other anyway, but the next one is then already waiting at the lock
when the previous commits, instead of leaving the database idle for a round trip and for
this process to notice the answer. Each writer keeps its pooled connection and cursor from
one batch to the next, and the arrays go in binary (``postgres_arrays``).

Reads are plain queries on pooled connections (``psycopg_pool``), prepared on first use;
the load of an aggregate that is not cached keeps a connection of its own, as a writer
does. Each pooled connection prepares the load a cold start needs when it opens
(``_configure``), and the first writer's connection rehearses an append when the store
opens (``_rehearse_append``). Every driver error is translated at this boundary
(``postgres_errors``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Self, cast

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow, args_row
from psycopg.types.numeric import Int8BinaryDumper, Int8Dumper

from domain.errors import ConcurrencyConflictError, DuplicateCommandError, StoreError
from domain.ports import (
    CommandRecord,
    Commit,
    EventPayload,
    NewEvent,
    RecordedEvent,
    Snapshot,
    StreamLocked,
    recorded_events,
)
from server.consumer_groups.store_postgres import PostgresConsumerGroupStore, forget_replica
from server.stores import postgres_arrays
from server.stores.event_rows import GATEWAY_COLUMNS, EventRow
from server.stores.postgres_arrays import (
    BigintArray,
    BytesArray,
    IntArray,
    TextArray,
    TimestamptzArray,
)
from server.stores.postgres_errors import (
    append_error,
    is_full,
    is_unavailable,
    one_line,
    store_error,
)
from server.stores.postgres_locks import PostgresStreamLocks
from server.stores.postgres_locks import configure as configure_lock_session
from server.stores.postgres_notify import NotificationListener
from server.stores.postgres_pool import LiveConnectionPool, closed_by_server, connection_pool
from server.stores.postgres_schema import (
    HEAD_POSITION,
    READING_PRIVILEGES,
    SERVING_PRIVILEGES,
    SNAPSHOT_PRIVILEGES,
    TURNS_CHANNEL,
    apply_migrations,
    check_schema,
    missing_migrations,
)
from server.stores.urls import StoreURLError, redacted_message, redacted_url, user_part

log = logging.getLogger("order_gateway.store.postgres")

CONNECT_DEFAULTS: dict[str, Any] = {
    # libpq would wait forever for an unreachable host.
    "connect_timeout": 10,
    # Names the gateway's sessions in pg_stat_activity.
    "application_name": "order-gateway",
}
"""Connection parameters used unless the URL sets them."""
LISTENER_APPLICATION_NAME = "order-gateway listener"

_COLUMNS = (
    "event_id, stream_id, stream_version, position, occurred_at,"
    " command_id, correlation_id, user_id, event_type, data, schema_version"
)
"""``RecordedEvent``'s fields, in its order, so rows load with ``args_row``."""
_READ_ALL = f"SELECT {_COLUMNS} FROM events WHERE position > %s ORDER BY position LIMIT %s"
_ROW_COLUMNS = (
    "event_id, stream_id, stream_version, position,"
    # Exact: extract() answers numeric, and timestamptz holds whole microseconds. Null for
    # 'infinity', which no gateway writes (a hand-edited row): it would fail the whole read.
    " CASE WHEN isfinite(occurred_at) THEN (extract(epoch FROM occurred_at) * 1000000)::bigint"
    " END,"
    " command_id, correlation_id, user_id, event_type, data, schema_version"
)
"""``_COLUMNS`` as ``server.stores.event_rows`` rows: the time in microseconds since the epoch."""
_READ_ALL_ROWS = f"SELECT {_ROW_COLUMNS} FROM events WHERE position > %s ORDER BY position LIMIT %s"
_READ_STREAM_ROWS_AFTER = (
    "SELECT head.position, e.* FROM (SELECT coalesce(max(position), 0) AS position FROM events)"
    f" AS head LEFT JOIN LATERAL (SELECT {_ROW_COLUMNS} FROM events"
    " WHERE stream_id = %s AND position > %s ORDER BY stream_version LIMIT %s) AS e ON true"
)
"""One stream's rows after a position, each with the head of the same snapshot (one
statement: one snapshot); one row of nulls but the head when none match. Ordered by
version, which follows position within a stream, so that the (stream_id, stream_version)
key serves it."""
_READ_STREAM = (
    f"SELECT {_COLUMNS} FROM events"
    " WHERE stream_id = %s AND stream_version > %s ORDER BY stream_version"
)
_FIND_COMMAND = (
    "SELECT c.fingerprint, e.event_id, e.stream_id, e.stream_version, e.position,"
    " e.occurred_at, e.command_id, e.correlation_id, e.user_id, e.event_type, e.data,"
    " e.schema_version"
    " FROM commands c LEFT JOIN events e"
    " ON e.position BETWEEN c.first_position AND c.first_position + c.event_count - 1"
    " WHERE c.command_id = %s ORDER BY e.position"
)
_FIND_RANGES = (
    "SELECT command_id, first_position, event_count FROM commands WHERE command_id = ANY(%s)"
)
_READ_RECORDS = (
    "SELECT command_id, first_position, event_count, fingerprint FROM commands"
    # ">" and ORDER BY in the same (the column's) collation, so the pages follow the
    # primary key's order, whatever it is.
    " WHERE command_id > %s ORDER BY command_id LIMIT %s"
)
# No index on event_id (ids are unique by construction, and an index would cost every
# append): verify groups the whole log once.
_REPEATED_EVENT_IDS = (
    "SELECT event_id, array_agg(position ORDER BY position) FROM events"
    " WHERE position <= %s GROUP BY event_id HAVING count(*) > 1"
    " ORDER BY min(position) LIMIT %s"
)
_LOAD_SNAPSHOT = (
    "SELECT stream_id, stream_version, schema_version, data FROM snapshots WHERE stream_id = %s"
)
_LOAD_SNAPSHOT_AND_EVENTS = (
    "SELECT s.stream_version, s.schema_version,"
    " CASE WHEN e.stream_version IS NULL"
    " OR e.stream_version = coalesce(s.stream_version, 0) + 1 THEN s.data END,"
    " e.event_id, e.event_type, e.schema_version, e.data"
    " FROM (SELECT %s::text AS stream_id) AS wanted"
    " LEFT JOIN snapshots AS s ON s.stream_id = wanted.stream_id"
    " LEFT JOIN LATERAL (SELECT event_id, event_type, schema_version, data, stream_version"
    " FROM events WHERE events.stream_id = wanted.stream_id"
    " AND stream_version > coalesce(s.stream_version, 0) ORDER BY stream_version) AS e ON true"
)
"""A stream's snapshot and the events after it in one statement, so one round trip: one row
per event (one with an empty event when none follows), the snapshot's version on each and
its data on the first only. Ordered by version as ``_READ_STREAM_ROWS_AFTER`` is. The first
row is the one right after the snapshot's version (a stream's versions have no gaps): a
window function numbering the rows cost the server a third more."""
_SAVE_SNAPSHOT = (
    "INSERT INTO snapshots (stream_id, stream_version, schema_version, data)"
    " VALUES (%s, %s, %s, %s) ON CONFLICT (stream_id) DO UPDATE SET"
    " stream_version = excluded.stream_version, schema_version = excluded.schema_version,"
    " data = excluded.data WHERE snapshots.stream_version < excluded.stream_version"
)
_APPEND = (
    "SELECT outcome, first_position, detail FROM og_append_chain("
    "%b::text[], %b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::integer[],"
    " %b::integer[], %b::text[], %b::bigint[], %b::text[],"
    " %b::integer[], %b::text[], %b::text[], %b::bigint[], %b::text[], %b::bytea[],"
    " %b::integer[])"
)


_ANNOUNCE_TURNS = "SELECT pg_notify(%s, %s)"


@dataclass(slots=True)
class _Pending:
    commit: Commit
    future: asyncio.Future[list[RecordedEvent]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class PostgresEventStore:
    """An ``EventStore`` on PostgreSQL; create it with ``await PostgresEventStore.open(url)``.

    Bound to the event loop it was opened on.
    """

    def __init__(
        self,
        pool: LiveConnectionPool,
        listener_factory: Callable[
            [Callable[[int | None], None], Callable[[str], None]], NotificationListener
        ],
        max_batch: int,
        known_head: int,
        stream_locks: PostgresStreamLocks,
        max_in_flight: int = 2,
    ) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[_Pending] = []
        self._writers: set[asyncio.Task[None]] = set()
        self._idle_connections = [_KeptConnection(pool) for _ in range(max_in_flight)]
        """One per writer: a writer takes one when it starts and puts it back when done."""
        self._loader = (
            _KeptConnection(pool, binary=True) if pool.max_size >= max_in_flight + 3 else None
        )
        """For ``load_snapshot_and_events``, taken by one load at a time (None meanwhile).
        None in a pool that would then keep fewer than two connections for the other
        reads (idempotency lookups, stream locks, subscriptions catching up)."""
        self._busy_streams: set[str] = set()
        self._busy_commands: set[str] = set()
        """Streams and command ids of the batches in flight: a commit naming one waits."""
        self._listeners: list[Callable[[], None]] = []
        self._contention_listeners: list[Callable[[str], None]] = []
        self._notifications = listener_factory(self._on_notification, self._on_turns)
        self._known_head = known_head
        """The highest position this process knows committed: notifications at or below it
        wake nobody (this process's own appends come back through NOTIFY too)."""
        self._stream_locks = stream_locks
        self._closing = False
        self._closed = asyncio.Event()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        min_connections: int = 2,
        max_connections: int = 10,
        pool_timeout: float = 10.0,
        max_batch: int = 128,
        max_in_flight: int = 2,
        migrate: bool = True,
    ) -> Self:
        """Connect, apply any missing schema migration, and open the connection pool.

        ``migrate`` False (a store opened only to be read): a database that lacks one of
        this release's migrations is refused instead, and nothing is changed.

        ``pool_timeout`` bounds the wait for a pooled connection; beyond it an operation fails
        with ``StoreUnavailableError``. ``max_in_flight`` batches of appends are sent at
        once at most, each holding a connection.
        """
        connect_kwargs = _connect_kwargs(url)
        migrator = await _connect(url, connect_kwargs)
        # Read only, the schema is only read: a failure there is no migration's.
        with _translated("migrate" if migrate else "read"):
            async with migrator:
                _refuse_encoding(migrator)
                await _refuse_no_usable_schema(migrator)
                if migrate:
                    await apply_migrations(migrator)
                elif missing := await missing_migrations(migrator):
                    raise StoreError(
                        f"the database lacks schema migrations {missing} of this gateway's:"
                        " verify it with the release that wrote it, or upgrade it first"
                        " with `order-gateway migrate`"
                    )
                await _refuse_unfit_schema(migrator, writing=migrate)
                cursor = await migrator.execute(HEAD_POSITION)
                row = await cursor.fetchone()
        with _translated("connect"):
            pool = connection_pool(
                url,
                connect_kwargs,
                pool_timeout,
                "order-gateway",
                _configure,
                min_connections,
                max_connections,
            )
            try:
                await pool.open(wait=True, timeout=pool_timeout)
            except BaseException:
                await pool.close()
                raise
            # Opened only when replicas contend for a stream; see ``postgres_locks``. Half
            # as many sessions to wait on as the pool has connections: five replicas with
            # the default pool then fit PostgreSQL's default max_connections, locks
            # included; a turn that finds none free goes on without the lock.
            waiting_sessions = max(1, max_connections // 2)
            lock_pool = connection_pool(
                url,
                connect_kwargs,
                pool_timeout,
                "order-gateway-locks",
                configure_lock_session,
                0,
                waiting_sessions + 1,
            )
            await lock_pool.open()

        listen_kwargs = dict(connect_kwargs)
        if "application_name" in listen_kwargs:
            listen_kwargs["application_name"] = LISTENER_APPLICATION_NAME

        def listener(
            on_wake: Callable[[int | None], None], on_turns: Callable[[str], None]
        ) -> NotificationListener:
            return NotificationListener(url, listen_kwargs, on_wake, on_turns)

        store = cls(
            pool,
            listener,
            max_batch,
            known_head=int(row[0]) if row else 0,
            stream_locks=PostgresStreamLocks(lock_pool, max_waiting=waiting_sessions),
            max_in_flight=max_in_flight,
        )
        try:
            with _translated("connect"):
                # The writer the first append takes (``_write_pending`` pops the last).
                await store._idle_connections[-1].take(_rehearse_append)
        except BaseException:
            await store.close()
            raise
        return store

    @staticmethod
    async def forget_group_replica(url: str, replica_id: str) -> None:
        """Free the consumer-group members and partitions of a dead replica
        (``store_postgres.forget_replica``), on a connection of its own."""
        with _translated("consumer group leases"):
            async with await psycopg.AsyncConnection.connect(
                url, autocommit=True, **_connect_kwargs(url)
            ) as conn:
                await forget_replica(conn, replica_id)

    @staticmethod
    async def holds_a_store(url: str) -> bool:
        """Whether the database at ``url`` holds a gateway's schema, without creating it."""
        conn = await _connect(url, _connect_kwargs(url))
        with _translated("connect"):
            async with conn:
                await _refuse_no_usable_schema(conn)
                # Another program's database may have tables of these names too: the
                # events table must have the gateway's columns.
                cursor = await conn.execute(
                    "SELECT to_regclass('schema_migrations') IS NOT NULL"
                    " AND (SELECT count(*) FROM pg_attribute WHERE attrelid ="
                    " to_regclass('events') AND attname = ANY(%s) AND NOT attisdropped) = %s",
                    (list(GATEWAY_COLUMNS), len(GATEWAY_COLUMNS)),
                )
                row = await cursor.fetchone()
        return bool(row and row[0])

    async def open_consumer_groups(self) -> PostgresConsumerGroupStore:
        """Consumer-group records in the same database (``server.consumer_groups``)."""
        return PostgresConsumerGroupStore(self._pool)

    # -- appends (group commit) -----------------------------------------------------

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        if self._closing:
            raise StoreError("the event store is closed")
        pending = _Pending(commit)
        self._pending.append(pending)
        if len(self._writers) < self._max_in_flight:
            # The task takes its batch when it first runs, so appends made meanwhile join.
            writer = asyncio.get_running_loop().create_task(
                self._write_pending(), name="order-gateway postgres writer"
            )
            self._writers.add(writer)
            # A writer leaves the set itself as it stops (``_write_pending``); this only
            # covers one cancelled before its first step.
            writer.add_done_callback(self._writers.discard)
        return await pending.future

    async def _write_pending(self) -> None:
        """Write batches until nothing waiting can be sent.

        A writer whose next commit depends on another writer's batch stops: that writer
        takes it once its batch is done, as it frees its streams before it looks again.
        """
        connection = self._idle_connections.pop()
        try:
            while True:
                # An append whose caller was cancelled before it was sent is dropped.
                self._pending = [p for p in self._pending if not p.future.done()]
                batch, streams, commands = _take_batch(
                    self._pending, self._max_batch, self._busy_streams, self._busy_commands
                )
                if not batch:
                    return
                self._busy_streams |= streams
                self._busy_commands |= commands
                try:
                    await self._write_batch(connection, batch)
                finally:
                    self._busy_streams -= streams
                    self._busy_commands -= commands
        finally:
            self._idle_connections.append(connection)
            # Now, as it decides to stop, not in a done callback: those run after the
            # callers this writer has just answered, and one of them may append again at
            # once. Still counted as a writer, this one would start no other, and that
            # append (and every command behind it on its streams) would wait until some
            # later append started one: seen as a replica's calls all hanging at once.
            self._writers.discard(cast("asyncio.Task[None]", asyncio.current_task()))

    async def _write_batch(self, connection: _KeptConnection, batch: list[_Pending]) -> None:
        try:
            outcomes = await connection.execute(_APPEND, _append_params([p.commit for p in batch]))
        except psycopg.Error as error:
            if len(batch) > 1 and not (is_unavailable(error) or is_full(error)):
                # One bad commit failed the statement; alone, each gets its own outcome.
                for pending in batch:
                    await self._write_batch(connection, [pending])
                return
            for pending in batch:
                _fail(pending, append_error(error, pending.commit), error)
            return
        except Exception as error:
            log.exception("append batch failed")
            for pending in batch:
                _fail(pending, StoreError("append failed"), error)
            return
        except asyncio.CancelledError:
            for pending in batch:
                pending.future.cancel()
            raise
        head = 0
        for pending, (outcome, first_position, detail) in zip(batch, outcomes, strict=True):
            if pending.future.done():
                continue
            if outcome == "appended":
                recorded = recorded_events(pending.commit, first_position)
                head = max(head, first_position + len(recorded) - 1)
                pending.future.set_result(recorded)
            elif outcome == "duplicate":
                pending.future.set_exception(DuplicateCommandError(pending.commit.command_id))
            else:
                pending.future.set_exception(ConcurrencyConflictError(detail))
        if head:
            self._advance(head)

    # -- stream locks shared by replicas (``domain.ports.SharedStreamLocks``) --------

    async def lock_stream(self, stream_id: str, after_version: int | None = None) -> StreamLocked:
        """The stream's advisory lock, held until ``unlock_stream``: a replica holds a
        contended stream across several commands (``domain.locks.StreamTurns``), longer
        than any one transaction, on connections apart from the pool that serves loads
        and appends (``postgres_locks``). Given ``after_version``, the events after it come
        back in the same round trip."""
        return await self._stream_locks.lock_stream(stream_id, after_version)

    def add_contention_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(stream_id)`` when another replica begins to take turns at a
        stream (through LISTEN, whose connection opens now)."""
        self._contention_listeners.append(listener)
        if not self._closing:
            self._notifications.start()

    async def announce_contention(self, stream_id: str) -> None:
        """Tell the other replicas this one takes turns at ``stream_id`` now: a replica
        that keeps winning the race never loses one to learn it."""
        with _translated("announce_contention"):
            async with self._pool.connection() as conn:
                await conn.execute(_ANNOUNCE_TURNS, (TURNS_CHANNEL, stream_id), prepare=True)

    def _on_turns(self, stream_id: str) -> None:
        for listener in list(self._contention_listeners):
            try:
                listener(stream_id)
            except Exception:
                log.exception("contention listener failed")

    async def unlock_stream(self, stream_id: str) -> None:
        await self._stream_locks.unlock_stream(stream_id)

    # -- reads ----------------------------------------------------------------------

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        return await self._events(_READ_STREAM, (stream_id, after_version), "read_stream")

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        # No visibility filter needed: og_append makes positions visible in order.
        return await self._events(_READ_ALL, (after_position, limit), "read_all")

    async def read_all_rows(self, after_position: int = 0, limit: int = 1000) -> list[EventRow]:
        """``read_all`` as plain rows (``server.stores.event_rows``), for catching up."""
        with _translated("read_all"):
            async with self._pool.connection() as conn:
                cursor = conn.cursor(binary=True)
                await cursor.execute(_READ_ALL_ROWS, (after_position, limit), prepare=True)
                rows: list[EventRow] = await cursor.fetchall()
        return rows

    async def read_stream_rows_after(
        self, stream_id: str, after_position: int, limit: int
    ) -> tuple[list[EventRow], int]:
        """``server.stores.event_rows.StreamRowReader``, for a subscription following one stream."""
        with _translated("read_stream"):
            async with self._pool.connection() as conn:
                cursor = conn.cursor(binary=True)
                await cursor.execute(
                    _READ_STREAM_ROWS_AFTER, (stream_id, after_position, limit), prepare=True
                )
                found = await cursor.fetchall()
        rows: list[EventRow] = [row[1:] for row in found if row[1] is not None]
        return rows, int(found[0][0])

    async def head_position(self) -> int:
        with _translated("head_position"):
            async with self._pool.connection() as conn:
                cursor = await conn.execute(HEAD_POSITION, prepare=True)
                row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def find_command(self, command_id: str) -> CommandRecord | None:
        with _translated("find_command"):
            async with self._pool.connection() as conn:
                cursor = conn.cursor(binary=True)
                await cursor.execute(_FIND_COMMAND, (command_id,), prepare=True)
                rows = await cursor.fetchall()
        if not rows:
            return None
        events = tuple(RecordedEvent(*row[1:]) for row in rows if row[1] is not None)
        return CommandRecord(command_id, rows[0][0], events)

    async def find_command_ranges(self, command_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """``server.verify.CommandLog``: the positions each recorded command points at."""
        with _translated("find_command"):
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_FIND_RANGES, (list(command_ids),))
                rows = await cursor.fetchall()
        return {command_id: (first, count) for command_id, first, count in rows}

    async def read_command_records(
        self, after_command_id: str, limit: int
    ) -> list[tuple[str, int, int, str]]:
        """``server.verify.CommandLog``: command records in command id order."""
        with _translated("find_command"):
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_READ_RECORDS, (after_command_id, limit))
                rows = await cursor.fetchall()
        return [(str(c), int(first), int(count), str(fp)) for c, first, count, fp in rows]

    async def repeated_event_ids(self, head: int, limit: int) -> list[tuple[str, list[int]]]:
        """``server.verify.CommandLog``: event ids that several events have."""
        with _translated("find_command"):
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_REPEATED_EVENT_IDS, (head, limit))
                rows = await cursor.fetchall()
        return [(str(event_id), [int(p) for p in positions]) for event_id, positions in rows]

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        with _translated("load_snapshot"):
            async with self._pool.connection() as conn:
                cursor = conn.cursor(row_factory=args_row(Snapshot), binary=True)
                await cursor.execute(_LOAD_SNAPSHOT, (stream_id,), prepare=True)
                return await cursor.fetchone()

    async def load_snapshot_and_events(
        self, stream_id: str
    ) -> tuple[Snapshot | None, list[EventPayload]]:
        with _translated("load_snapshot"):
            loader = self._loader
            if loader is None or self._closing:
                # Another load has it (or it is being released): one of the pool's.
                async with self._pool.connection() as conn:
                    rows = await _load_snapshot_and_events(conn, stream_id)
            else:
                self._loader = None
                try:
                    rows = await loader.execute(_LOAD_SNAPSHOT_AND_EVENTS, (stream_id,))
                finally:
                    self._loader = loader
                    if self._closing:
                        await loader.release()
        version, schema_version, data = rows[0][:3]
        if version is not None and data is None:
            raise StoreError(f"snapshot of {stream_id} not followed by its next version")
        snapshot = None if version is None else Snapshot(stream_id, version, schema_version, data)
        payloads: list[EventPayload] = [row[3:] for row in rows if row[3] is not None]
        return snapshot, payloads

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        with _translated("save_snapshot"):
            async with self._pool.connection() as conn:
                await conn.execute(
                    _SAVE_SNAPSHOT,
                    (
                        snapshot.stream_id,
                        snapshot.stream_version,
                        snapshot.schema_version,
                        snapshot.data,
                    ),
                )

    async def _events(
        self, query: str, params: tuple[Any, ...], operation: str
    ) -> list[RecordedEvent]:
        with _translated(operation):
            async with self._pool.connection() as conn:
                cursor = conn.cursor(row_factory=args_row(RecordedEvent), binary=True)
                await cursor.execute(query, params, prepare=True)
                return await cursor.fetchall()

    # -- wake-ups -------------------------------------------------------------------

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Wake ``listener`` after this process's appends and, through LISTEN, others'.

        The LISTEN connection opens with the first listener. A notification can be lost
        (see ``postgres_notify``): subscribers poll too, so that only delays them.
        """
        self._listeners.append(listener)
        if not self._closing:
            self._notifications.start()

    def _on_notification(self, head: int | None) -> None:
        if head is None:
            self._wake()
        elif head > self._known_head:
            self._advance(head)

    def _advance(self, head: int) -> None:
        self._known_head = max(self._known_head, head)
        self._wake()

    def _wake(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                log.exception("commit listener failed")

    # -- shutdown -------------------------------------------------------------------

    async def close(self) -> None:
        """Finish the appends already made, then release the connections. Idempotent."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            while self._writers:
                await asyncio.wait(set(self._writers))
            for connection in self._idle_connections:
                await connection.release()
            if self._loader is not None:
                # Else a load has it, and releases it when it ends.
                await self._loader.release()
            await self._stream_locks.close()
            await self._notifications.stop()
            await self._pool.close()
        finally:
            self._closed.set()


class _KeptConnection:
    """A pooled connection kept from one statement to the next, until it fails: one for
    each writer's appends, one for loads.

    Taking it from the pool and giving it back for every batch cost more than a batch of
    a few commits; the cursor is kept too, with the adapters it chose for the arrays. For
    the load of an aggregate that is not cached (the first command on it after a restart)
    the pool's checkout and return cost ~0.14 ms of CPU, when the whole load costs ~0.5.
    """

    def __init__(self, pool: LiveConnectionPool, binary: bool = False) -> None:
        self._pool = pool
        self._binary = binary
        self._connection: psycopg.AsyncConnection[TupleRow] | None = None
        self._cursor: psycopg.AsyncCursor[TupleRow] | None = None

    async def take(
        self, prepare: Callable[[psycopg.AsyncConnection[TupleRow]], Awaitable[None]]
    ) -> None:
        """Take a connection now, and ``prepare`` it, rather than on the first ``execute``."""
        try:
            await prepare((await self._cursor_taken()).connection)
        except BaseException:
            await self.release()
            raise

    async def execute(self, query: str, params: Sequence[Any]) -> list[TupleRow]:
        """Run ``query`` (prepared) and return its rows.

        Whatever fails, the connection goes back to the pool, which replaces it if it is
        broken, and the next call takes another.
        """
        try:
            cursor = await self._cursor_taken()
            await cursor.execute(query, params, prepare=True)
            return await cursor.fetchall()
        except BaseException:
            await self.release()
            raise

    async def _cursor_taken(self) -> psycopg.AsyncCursor[TupleRow]:
        if self._connection is not None and closed_by_server(self._connection):
            # Closed while kept (a restart since the last statement): given back closed,
            # for the pool to replace, and another one taken (``postgres_pool``).
            await self._connection.close()
            await self.release()
        if self._cursor is None:
            self._connection = await self._pool.getconn()
            self._cursor = self._connection.cursor(binary=self._binary)
        return self._cursor

    async def release(self) -> None:
        if self._connection is not None:
            connection, self._connection, self._cursor = self._connection, None, None
            await self._pool.putconn(connection)


def _take_batch(
    pending: list[_Pending], limit: int, busy_streams: set[str], busy_commands: set[str]
) -> tuple[list[_Pending], set[str], set[str]]:
    """Remove and return up to ``limit`` commits of ``pending`` to send now, in order, with
    the streams and command ids they name.

    ``og_append_chain`` judges the commits of one call one after another, so they may share
    streams and command ids. A commit that shares one with a batch in flight (``busy_…``)
    waits, and so does every later commit that shares one with a commit left waiting:
    sent now, it could reach the database's append lock before that batch, and not see
    its outcome. Commits independent of everything left waiting go now.
    """
    batch: list[_Pending] = []
    waiting: list[_Pending] = []
    streams: set[str] = set()
    command_ids: set[str] = set()
    blocked_streams = set(busy_streams)
    blocked_commands = set(busy_commands)
    for item in pending:
        commit = item.commit
        touched = {*commit.expected_versions, *(e.stream_id for e in commit.events)}
        if (
            len(batch) >= limit
            or commit.command_id in blocked_commands
            or not blocked_streams.isdisjoint(touched)
        ):
            waiting.append(item)
            blocked_streams |= touched
            blocked_commands.add(commit.command_id)
            continue
        batch.append(item)
        streams |= touched
        command_ids.add(commit.command_id)
    pending[:] = waiting
    return batch, streams, command_ids


def _append_params(commits: Sequence[Commit]) -> tuple[list[Any], ...]:
    """``og_append``'s arguments: one array per column, commits' rows laid end to end.

    Typed (``postgres_arrays``), so that each is encoded by the cheap dumper for its type.
    """
    expected = [
        (i, stream, version, c.follows.get(stream, ""))
        for i, c in enumerate(commits, start=1)
        for stream, version in c.expected_versions.items()
    ]
    events = [(i, e) for i, c in enumerate(commits, start=1) for e in c.events]
    return (
        TextArray([c.command_id for c in commits]),
        TextArray([c.fingerprint for c in commits]),
        TextArray([c.correlation_id for c in commits]),
        TextArray([c.user_id for c in commits]),
        TimestamptzArray([c.occurred_at.astimezone(dt.UTC) for c in commits]),
        IntArray([len(c.events) for c in commits]),
        IntArray([i for i, _, _, _ in expected]),
        TextArray([stream for _, stream, _, _ in expected]),
        BigintArray([version for _, _, version, _ in expected]),
        TextArray([event_id for _, _, _, event_id in expected]),
        IntArray([i for i, _ in events]),
        TextArray([e.event_id for _, e in events]),
        TextArray([e.stream_id for _, e in events]),
        BigintArray([e.stream_version for _, e in events]),
        TextArray([e.event_type for _, e in events]),
        BytesArray([e.data for _, e in events]),
        IntArray([e.schema_version for _, e in events]),
    )


def _fail(pending: _Pending, error: BaseException, cause: BaseException) -> None:
    if not pending.future.done():
        error.__cause__ = cause
        pending.future.set_exception(error)


async def _load_snapshot_and_events(
    conn: psycopg.AsyncConnection[TupleRow], stream_id: str
) -> list[TupleRow]:
    cursor = conn.cursor(binary=True)
    await cursor.execute(_LOAD_SNAPSHOT_AND_EVENTS, (stream_id,), prepare=True)
    return await cursor.fetchall()


def _connect_kwargs(url: str) -> dict[str, Any]:
    """The connection settings the gateway adds to those ``url`` gives."""
    user = user_part(url)
    if user is not None and any(character in user for character in "@/?#"):
        # libpq would end the user part at its first "@", a parser at the first "/", "?"
        # or "#": either would take part of the password for the host, the port or the
        # database, and quote it in its complaint.
        raise StoreURLError(
            f"invalid PostgreSQL store URL {redacted_url(url)!r}: its user name or password"
            " holds '@', '/', '?' or '#'; percent-encode them (%40, %2F, %3F, %23)"
        )
    try:
        given = conninfo_to_dict(url)
    except psycopg.ProgrammingError as error:
        raise _invalid_url(url, error) from None
    # libpq parses the port only when it connects, and its complaint would read as an
    # unreachable server. One port per host, comma-separated; an empty one is the default.
    for port in str(given.get("port", "")).split(","):
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65_535):
            raise StoreURLError(
                f"invalid PostgreSQL store URL {redacted_url(url)!r}:"
                f" port {port!r} is not a number from 1 to 65535"
            )
    encoding = str(given.get("client_encoding", "UTF8"))
    if encoding.replace("-", "").upper() != "UTF8":
        raise StoreURLError(
            f"invalid PostgreSQL store URL {redacted_url(url)!r}: client_encoding"
            f" {encoding!r}: the gateway speaks UTF-8 to PostgreSQL (leave it out)"
        )
    return {
        # Always: the binary arrays appends send are UTF-8 (``postgres_arrays``), and
        # PGCLIENTENCODING or a role's setting would otherwise have the server read them
        # as another encoding (a LATIN1 session stored "José" as "JosÃ©").
        "client_encoding": "UTF8",
        **{key: value for key, value in CONNECT_DEFAULTS.items() if key not in given},
    }


SERVER_ENCODINGS = ("UTF8", "SQL_ASCII")
"""Databases the gateway's text can be stored in as it is: any Unicode text in UTF8; the
UTF-8 bytes as they are in SQL_ASCII, which converts nothing."""


def _refuse_encoding(connection: psycopg.AsyncConnection[TupleRow]) -> None:
    """Refuse a database whose encoding cannot hold every text a client may send: in
    LATIN1, say, a user id in Greek letters would fail its command INTERNAL."""
    encoding = connection.info.parameter_status("server_encoding")
    if encoding is not None and encoding not in SERVER_ENCODINGS:
        raise StoreError(
            f"the database's encoding is {encoding}, which cannot hold every text"
            " a client may send: create the gateway's database with ENCODING 'UTF8'"
        )


async def _refuse_no_usable_schema(connection: psycopg.AsyncConnection[TupleRow]) -> None:
    """Refuse a role that may use no schema of its search path: PostgreSQL then resolves
    no table name and creates nothing, so the gateway's tables would look absent (verify:
    "no gateway schema") and a migration would fail "no schema has been selected to create
    in", where the cause is a missing USAGE grant (or a search path naming no schema)."""
    cursor = await connection.execute(
        "SELECT current_schema() IS NULL, current_user, current_setting('search_path')"
    )
    row = await cursor.fetchone()
    if row and row[0]:
        raise StoreError(
            f"the role {row[1]} may use no schema of its search_path ({row[2]}): none of"
            " them exists or grants it USAGE; see docs/operations.md, Privileges"
        )


async def _refuse_unfit_schema(
    connection: psycopg.AsyncConnection[TupleRow], *, writing: bool
) -> None:
    """Refuse a database the gateway could open but not use, rather than serve it and
    fail every command that needs what is missing (``INTERNAL``): one whose migrations
    are all recorded but that lacks a table or a function they made (dropped by hand,
    restored in part), or a role without the grants docs/operations.md lists, for
    ``writing`` or only to read (verify). Without the snapshots' grants it serves, and
    skips the snapshots (``domain.snapshots``): said once here."""
    wanted = {**SERVING_PRIVILEGES, **SNAPSHOT_PRIVILEGES} if writing else READING_PRIVILEGES
    check = await check_schema(connection, wanted)
    if check.missing:
        raise StoreError(
            f"the database's schema is incomplete: it lacks {', '.join(check.missing)},"
            " though schema_migrations records every migration that makes them"
        )
    needed = [
        (privilege, name) for privilege, name in check.denied if name not in SNAPSHOT_PRIVILEGES
    ]
    if needed:
        raise StoreError(
            f"the role {check.role} may not {_denials(needed)}; see docs/operations.md, Privileges"
        )
    if check.denied:
        log.warning(
            "the role %s may not %s: snapshots will be skipped; see docs/operations.md, Privileges",
            check.role,
            _denials(check.denied),
        )


_VERBS = {
    "SELECT": "select from",
    "INSERT": "insert into",
    "UPDATE": "update",
    "DELETE": "delete from",
    "EXECUTE": "execute",
}


def _denials(denied: list[tuple[str, str]]) -> str:
    """The privileges (SQL's names) a role lacks, in words grouped by privilege in their
    order: "insert into events or commands, nor execute og_append_chain()"."""
    names: dict[str, list[str]] = {}
    for privilege, name in denied:
        names.setdefault(privilege, []).append(name)
    return ", nor ".join(f"{_VERBS[privilege]} {_either(on)}" for privilege, on in names.items())


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


async def _connect(url: str, connect_kwargs: dict[str, Any]) -> psycopg.AsyncConnection[TupleRow]:
    """The first connection a command makes to the store: a URL that psycopg or libpq
    refuses before reaching any server is a configuration error, not an unavailable
    database."""
    try:
        return await psycopg.AsyncConnection.connect(url, autocommit=True, **connect_kwargs)
    except psycopg.ProgrammingError as error:
        # psycopg checks some parameters' values ("bad value for connect_timeout").
        raise _invalid_url(url, error) from None
    except psycopg.OperationalError as error:
        refused = _REFUSED_BY_LIBPQ.match(str(error))
        if refused:
            raise _invalid_url(url, refused["complaint"]) from None
        raise store_error(error, "connect") from error
    except psycopg.Error as error:
        raise store_error(error, "connect") from error


_REFUSED_BY_LIBPQ = re.compile(
    r"connection is bad: (?:.* failed: )?(?P<complaint>(?:invalid \w+ value: |weak sslmode "
    r'|invalid integer value ".*" for connection option ).*)',
    re.DOTALL,
)
"""libpq's complaints about a parameter's value, made before it connects (``sslmode=
bogus``, ``keepalives=abc``): psycopg raises them as OperationalError, as it does
a refused connection."""


def _invalid_url(url: str, error: psycopg.Error | str) -> StoreURLError:
    """A configuration error, reported with the URL's secrets masked: libpq and psycopg
    quote what they cannot take, the password included. Raise it unchained, for the
    same reason."""
    message = one_line(redacted_message(str(error), url))
    return StoreURLError(f"invalid PostgreSQL store URL {redacted_url(url)!r}: {message}")


async def _configure(conn: psycopg.AsyncConnection[TupleRow]) -> None:
    # psycopg sends a Python int as the smallest type that holds it, so one query would be
    # prepared once per mix of int2/int4/int8 parameters: always send bigint instead.
    conn.adapters.register_dumper(int, Int8Dumper)
    conn.adapters.register_dumper(int, Int8BinaryDumper)
    postgres_arrays.register(conn)
    # Timestamps load as aware datetimes in UTC, as every store returns them. og_append
    # relies on READ COMMITTED, whatever the database's default isolation level.
    # Generic plans: PostgreSQL plans a prepared statement (and each statement inside a
    # PL/pgSQL function) afresh for its first five executions on a connection, and for
    # ever after when the values' own plan looks cheaper, as it does for a stream's load:
    # ~0.15 ms each time on the server. Every statement the gateway sends reads by
    # key, a plan that does not depend on the values (og_append's reads are index-only
    # whatever the statistics), so each is planned once per connection: the first order
    # on a long stream after a restart took 3.0-3.5 ms against 3.9-4.0 (restarts of
    # either taking turns in one process; docs/performance.md, "Cold start of a long
    # stream").
    await conn.execute(
        "SET TimeZone TO 'UTC'; SET default_transaction_isolation TO 'read committed';"
        " SET plan_cache_mode TO force_generic_plan"
    )
    # A session's first statement on a table loads the table's and its indexes' catalog
    # entries, and a statement prepared on first use costs a round trip more: the first
    # cold load on each pooled connection took ~4 ms against ~0.8 for the next ones
    # (measured here). Paid now, when the pool opens the connection, instead of by the
    # first command on a long stream after a restart.
    try:
        await _load_snapshot_and_events(conn, "")
    except psycopg.ProgrammingError:
        # E.g. a role without rights on the snapshots table: its loads fail the same way
        # and fall back to whole streams (``domain.snapshots``); not a reason to refuse
        # the connection.
        log.debug("snapshot statement not prepared", exc_info=True)


async def _rehearse_append(conn: psycopg.AsyncConnection[TupleRow]) -> None:
    # A session's first appends cost more than the next ones, whatever the stream: the
    # first 5-7 ms (og_append_chain compiled, and its statements planned under the append
    # lock), the second ~0.3 ms more than the next ones (measured here). The first order
    # on a long stream after a restart may well be the second append of the process. One
    # append rehearsed in a transaction rolled back: the first real one then took
    # 1.6-1.8 ms, the second 0.93-0.97 against 1.0-1.16 (~0.75 for the next ones).
    # Nothing is written and no position is used up (vacuum removes the dead rows), but
    # it holds the append lock, every replica's, as long as a session's first append
    # would: so only the connection of the first writer rehearses, when the store opens,
    # not every connection the pool opens for reads as it grows. The rollback makes
    # psycopg deallocate the session's prepared statements; a writer prepares only its
    # own.
    try:
        async with conn.transaction(force_rollback=True):
            cursor = await conn.execute(_APPEND, _append_params([_rehearsal()]))
            await cursor.fetchall()
    except psycopg.Error:
        # E.g. a role that may only read: it never appends, and is not refused for that.
        log.debug("append not rehearsed", exc_info=True)


def _rehearsal() -> Commit:
    """A commit of one event on a stream of its own, for ``_rehearse_append``."""
    stream = f"og-rehearsal-{uuid.uuid4()}"
    return Commit(
        command_id=str(uuid.uuid4()),
        fingerprint="",
        correlation_id="",
        user_id="",
        occurred_at=dt.datetime.now(dt.UTC),
        expected_versions={stream: 0},
        events=[NewEvent(str(uuid.uuid4()), stream, 1, "Rehearsal", b"{}")],
    )


@contextmanager
def _translated(operation: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as error:
        raise store_error(error, operation) from error
