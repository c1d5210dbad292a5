"""The supervisor's side of a SQLite store shared by workers: the one writer.

SQLite lets one connection write at a time, and a connection waiting for another
process's lock polls with sleeps of 1 to 100 ms (its busy handler), so workers that each
wrote the file would queue on those sleeps. Instead the supervisor opens the store, and
with it the only writer, and workers hand it their appends over a unix socket: commits
from every worker are queued together and still share one transaction and one fsync
(group commit). Workers read the file themselves (WAL readers do not block the writer).

After each commit every worker is sent a wake-up, which its subscriptions take as the
store's commit notification: live delivery across workers costs one local message, not
the 1 s poll.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path

from domain.ports import RecordedEvent
from server.stores.sqlite import SQLiteEventStore
from server.workers.writer_protocol import WAKE, FrameBuffer, encode_outcome, frame

log = logging.getLogger("order_gateway.workers")


class _Connection(asyncio.Protocol):
    def __init__(self, service: WriterService) -> None:
        self._service = service
        self._buffer = FrameBuffer()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._service.closed:
            # Accepted as the writer was closing: this worker must learn it is gone too.
            transport.close()
            return
        self._service.connections.add(self)
        # The worker waits for this first wake-up before it serves: it knows the writer
        # has taken its connection.
        transport.write(self._service.wake)

    def connection_lost(self, exc: Exception | None) -> None:
        # Appends already handed to the writer still commit: the worker that sent them
        # is gone, and its clients never saw an answer (a retry with the same command_id
        # replays them).
        self._service.connections.discard(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        store = self._service.store
        for call_id, commit in self._buffer.feed(data):
            task = asyncio.ensure_future(store.append(commit))
            task.add_done_callback(functools.partial(self._answer, call_id))

    def _answer(self, call_id: int, done: asyncio.Future[list[RecordedEvent]]) -> None:
        if done.cancelled():
            return
        error = done.exception()
        self.send(frame((call_id, encode_outcome(done.result() if error is None else error))))

    def send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class WriterService:
    """Serves appends to ``store`` on a unix socket at ``path``."""

    def __init__(self, store: SQLiteEventStore, path: Path) -> None:
        self.store = store
        self.path = path
        self.connections: set[_Connection] = set()
        self.closed = False
        self._server: asyncio.Server | None = None
        self.wake = frame((WAKE, None))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), str(self.path))
        self.store.add_commit_listener(self._broadcast)

    def _broadcast(self) -> None:
        for connection in list(self.connections):
            connection.send(self.wake)

    async def close(self) -> None:
        """Close the store (appends queued finish first), then the workers' connections:
        a worker still running sees the writer gone and stops."""
        self.closed = True
        if self._server is not None:
            self._server.close()
        await self.store.close()
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()
