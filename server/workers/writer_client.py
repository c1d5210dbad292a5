"""A worker's SQLite store when the supervisor owns the writer (``writer_service``).

Reads go to this process's own SQLite connections, as with a store of its own; appends
go over the unix socket to the supervisor's writer, and its wake-ups after each commit
call this store's commit listeners. If the supervisor goes away, appends in flight and
new ones fail as ``StoreUnavailableError`` (nothing was acknowledged that is not
durable), and the worker stops (``server.workers.worker``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final

from domain.errors import StoreError, StoreUnavailableError
from domain.ports import CommandRecord, Commit, RecordedEvent
from server.event_rows import EventRow
from server.stores.sqlite import SQLiteEventStore
from server.workers.writer_protocol import WAKE, FrameBuffer, Outcome, decode_outcome, frame

log = logging.getLogger("order_gateway.workers")


CONNECT_TIMEOUT_SECONDS: Final = 30.0


class _WriterConnection(asyncio.Protocol):
    def __init__(self, store: SharedWriterStore) -> None:
        self._store = store
        self._buffer = FrameBuffer()
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done at the writer's first wake-up, sent when it has taken the connection."""

    def data_received(self, data: bytes) -> None:
        for call_id, outcome in self._buffer.feed(data):
            if call_id == WAKE:
                if not self.accepted.done():
                    self.accepted.set_result(None)
                self._store.notify()
            else:
                self._store.answer(call_id, outcome)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(
                StoreUnavailableError("the gateway's SQLite writer refused the connection")
            )
        self._store.writer_lost()


class SharedWriterStore:
    """An ``EventStore`` on a SQLite file whose writer lives in the supervisor."""

    def __init__(self, reader: SQLiteEventStore) -> None:
        self._reader = reader
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[list[RecordedEvent]]] = {}
        self._ids = itertools.count(WAKE + 1)
        self._listeners: list[Callable[[], None]] = []
        self._closing = False
        self.lost = asyncio.Event()
        """Set when the connection to the writer is gone."""

    @classmethod
    async def open(cls, path: str | Path, socket_path: str | Path) -> SharedWriterStore:
        reader = await SQLiteEventStore.open(path)
        store = cls(reader)
        try:
            transport, connection = await asyncio.get_running_loop().create_unix_connection(
                lambda: _WriterConnection(store), str(socket_path)
            )
            assert isinstance(transport, asyncio.Transport)
            store._transport = transport
            await asyncio.wait_for(connection.accepted, CONNECT_TIMEOUT_SECONDS)
        except BaseException:
            await store.close()
            raise
        return store

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        transport = self._transport
        if self._closing:
            raise StoreError("the store is closed")
        if transport is None or transport.is_closing():
            raise StoreUnavailableError("the gateway's SQLite writer process is gone")
        call_id = next(self._ids)
        future: asyncio.Future[list[RecordedEvent]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        transport.write(frame((call_id, commit)))
        return await future

    def answer(self, call_id: int, outcome: Outcome) -> None:
        future = self._pending.pop(call_id, None)
        if future is None or future.done():
            return
        try:
            future.set_result(decode_outcome(outcome))
        except Exception as error:  # the append's own error, for its caller
            future.set_exception(error)

    def notify(self) -> None:
        for listener in self._listeners:
            listener()

    def writer_lost(self) -> None:
        self._transport = None
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                # Whether the writer committed it before it went is unknown: the caller
                # retries with the same command_id, which replays it if it did.
                future.set_exception(
                    StoreUnavailableError("the gateway's SQLite writer process is gone")
                )
        if not self.lost.is_set():
            log.error("lost the connection to the SQLite writer (the supervisor process)")
            self.lost.set()

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        return await self._reader.read_stream(stream_id, after_version)

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        return await self._reader.read_all(after_position, limit)

    async def read_all_rows(self, after_position: int = 0, limit: int = 1000) -> list[EventRow]:
        return await self._reader.read_all_rows(after_position, limit)

    async def read_stream_rows_after(
        self, stream_id: str, after_position: int, limit: int
    ) -> tuple[list[EventRow], int]:
        return await self._reader.read_stream_rows_after(stream_id, after_position, limit)

    async def head_position(self) -> int:
        return await self._reader.head_position()

    async def find_command(self, command_id: str) -> CommandRecord | None:
        return await self._reader.find_command(command_id)

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    async def close(self) -> None:
        """Appends already sent are answered first; new ones are refused."""
        self._closing = True
        if self._pending:
            await asyncio.gather(*self._pending.values(), return_exceptions=True)
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        await self._reader.close()
