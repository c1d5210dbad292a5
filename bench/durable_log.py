"""The least a durable SQLite event store has to do per command: the durable floor's store.

Each append INSERTs its events under a unique (stream, version) key, the key optimistic
concurrency needs, and COMMITs them in WAL mode with ``synchronous=FULL``: one fsync, the
same durability as the gateway's SQLite store. A writer thread takes whatever appends are
waiting (up to ``MAX_BATCH``) into one transaction, so that concurrent commands share an
fsync, and the event loop is never blocked on the disk; with ``on_loop`` the event loop
commits each append itself instead (no thread hand-offs, nothing shared, the loop blocked
for each fsync: the least latency one caller can see). There is nothing else: no reads,
no version checks beyond the key, no metadata, no idempotency, no notifications. A
grpc.aio server that does this and nothing more bounds what any gateway that keeps its
events durably in SQLite can reach on the same machine: the gateway does all of it, and
validation, business rules and the rest besides.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

MAX_BATCH = 128
"""Appends per transaction at most, as the gateway's SQLite store."""

Row = tuple[str, int, bytes]
"""(stream, version, data) of one event."""

_Pending = tuple[Sequence[Row], asyncio.Future[None]]


class DurableLog:
    """Appends rows of events to a SQLite file; ``append`` returns once they are on disk."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop, on_loop: bool = False) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")
        self._connection.execute(
            "CREATE TABLE IF NOT EXISTS events ("
            " position INTEGER PRIMARY KEY,"
            " stream TEXT NOT NULL,"
            " version INTEGER NOT NULL,"
            " data BLOB NOT NULL,"
            " UNIQUE (stream, version))"
        )
        self._writer: threading.Thread | None = None
        if not on_loop:
            self._writer = threading.Thread(target=self._write_forever, name="durable-log-writer")
            self._writer.start()

    async def append(self, rows: Sequence[Row]) -> None:
        if self._writer is None:
            error = self._write(rows)
            if error is not None:
                raise error
            return
        done = self._loop.create_future()
        self._queue.put((rows, done))
        await done

    def close(self) -> None:
        """Writes what was queued before, then stops the writer and closes the file."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
        self._connection.close()

    def _write_forever(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stopping = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)
            if stopping:
                return

    def _commit(self, batch: list[_Pending]) -> None:
        # One bad append fails its whole batch: the floor's callers never collide, so
        # that is a bug in the benchmark, which its calls report as errors.
        error = self._write([row for rows, _ in batch for row in rows])
        self._loop.call_soon_threadsafe(_settle, [done for _, done in batch], error)

    def _write(self, rows: Sequence[Row]) -> sqlite3.Error | None:
        try:
            self._connection.execute("BEGIN IMMEDIATE")
            self._connection.executemany(
                "INSERT INTO events (stream, version, data) VALUES (?, ?, ?)", rows
            )
            self._connection.execute("COMMIT")
        except sqlite3.Error as failed:
            if self._connection.in_transaction:
                self._connection.execute("ROLLBACK")
            return failed
        return None


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
