"""The supervisor's hub: what the workers of one gateway tell each other, and on SQLite
the store's one writer.

**Commits across workers.** A worker's subscriptions, and the follower that keeps its
aggregate cache up to date (``cache_follower``), sleep until told that something
committed; with several workers they must hear of the others' commits. So the hub learns
of every commit (an append it wrote, or a worker's notice, each with the streams it
moved) and, once per turn of its event loop, sends every worker one wake-up: a local
message, not the 1 s poll. The wake-up names the streams *other* workers moved, with
their new versions: only those can leave the worker's cache behind (at one caller,
reading each own commit back in every worker doubled the server CPU per call), and the
worker's cache follower marks them stale without reading anything. On SQLite it also
carries the events its writer
recorded since the last one: a worker's subscriptions deliver them as they stand
instead of reading them back from the file first (a read in every worker, in a reader
thread, on the path from commit to subscriber).

**SQLite's writer.** SQLite lets one connection write at a time, and a connection
waiting for another process's write lock polls with sleeps of 1 to 100 ms (its busy
handler), so workers each writing the file would queue on those sleeps. On SQLite the
supervisor opens the store, and with it the only writer; workers hand it their appends,
which are queued together and still share one transaction and one fsync (group commit).
Workers read the file themselves (WAL readers do not block the writer). The consumer
groups' records and partition leases are the supervisor's too (``server.workers.groups``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from pathlib import Path
from typing import Any

from domain.ports import Commit, RecordedEvent
from server.stores.sqlite import SQLiteEventStore
from server.workers.groups import GroupsHost
from server.workers.hub_protocol import (
    GROUP_DELETED,
    NOTICE,
    WAKE,
    WANT,
    FrameBuffer,
    FrameWriter,
    GroupCall,
    Moved,
    decode_commit,
    encode_call_outcome,
    encode_events,
    encode_outcome,
    frame,
    moved_by,
)

log = logging.getLogger("order_gateway.workers")


class _Connection(asyncio.Protocol):
    """One worker's connection."""

    def __init__(self, hub: WorkerHub) -> None:
        self._hub = hub
        self._buffer = FrameBuffer()
        self._out = FrameWriter()
        self.moved: dict[str, int] = {}
        """Streams other workers moved since this worker's last wake-up: latest version."""
        self.wants_recorded = False
        """The worker has live subscriptions: its wake-ups carry the recorded events."""
        self.replicas: set[str] = set()
        """The worker's consumer-group replica ids (its lease calls name them)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._out.transport = transport
        if self._hub.closed:
            # Accepted as the hub was closing: this worker must learn it is gone too.
            transport.close()
            return
        self._hub.connections.add(self)
        # The worker waits for this first wake-up before it serves: it knows the hub has
        # taken its connection.
        transport.write(self._hub.idle_wake)

    def connection_lost(self, exc: Exception | None) -> None:
        # Appends already handed to the writer still commit: the worker that sent them
        # is gone, and its clients never saw an answer (a retry with the same command_id
        # replays them).
        self._hub.connections.discard(self)
        self._out.transport = None
        if self._hub.groups is not None:
            # The worker is gone (a worker closes its connection last, after its groups
            # stopped): its partitions need not wait out their leases.
            self._hub.groups.forget(self.replicas)

    def data_received(self, data: bytes) -> None:
        for call_id, message in self._buffer.feed(data):
            if call_id == NOTICE:
                self._hub.committed(self, message)
            elif call_id == WANT:
                self.wants_recorded = message
            elif isinstance(message, GroupCall):
                self._group_call(call_id, message)
            else:
                self._append(call_id, decode_commit(message))

    def _append(self, call_id: int, commit: Commit) -> None:
        writer = self._hub.writer
        if writer is None:
            log.error("a worker sent an append, but this gateway's store has no shared writer")
            self.close()
            return
        try:
            appended = writer.append_soon(commit)
        except Exception as error:  # closed: answered like any failed append
            self.send(frame((call_id, encode_outcome(error))))
            return
        appended.add_done_callback(functools.partial(self._answer, call_id, commit))

    def _group_call(self, call_id: int, call: GroupCall) -> None:
        groups = self._hub.groups
        if groups is None:
            log.error("a worker sent a consumer-group call, but this gateway keeps no groups")
            self.close()
            return
        task = asyncio.ensure_future(groups.call(call, self))
        task.add_done_callback(functools.partial(self._answer_call, call_id))

    def _answer_call(self, call_id: int, done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            return
        error = done.exception()
        self.send(frame((call_id, encode_call_outcome(done.result() if error is None else error))))

    def _answer(
        self, call_id: int, commit: Commit, done: asyncio.Future[list[RecordedEvent]]
    ) -> None:
        if done.cancelled():
            return
        error = done.exception()
        if error is None:
            self._hub.committed(self, moved_by(commit.events), done.result())
        self.send(frame((call_id, encode_outcome(done.result() if error is None else error))))

    @property
    def connected(self) -> bool:
        return self._out.transport is not None

    def send(self, data: bytes) -> None:
        """Written at the end of this turn of the loop, with the turn's other frames."""
        if self._out.open:
            self._out.send(data)

    def close(self) -> None:
        if self._out.transport is not None:
            self._out.transport.close()


class WorkerHub:
    """Serves the workers on a unix socket at ``path``; ``writer``: SQLite's store, whose
    appends the workers hand over (None for a store each worker writes itself);
    ``groups``: the consumer groups the supervisor keeps for them (SQLite)."""

    def __init__(
        self,
        path: Path,
        writer: SQLiteEventStore | None = None,
        groups: GroupsHost | None = None,
    ) -> None:
        self.path = path
        self.writer = writer
        self.groups = groups
        if groups is not None:
            groups.on_deleted = self._group_deleted
        self.connections: set[_Connection] = set()
        self.closed = False
        self._server: asyncio.Server | None = None
        self._wake_pending = False
        self._recorded: list[RecordedEvent] = []
        """Events the writer recorded since the last wake-up."""
        self.idle_wake = frame((WAKE, ([], b"")))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), str(self.path))

    def committed(
        self, origin: _Connection, moved: Moved, recorded: list[RecordedEvent] | None = None
    ) -> None:
        """``origin``'s worker committed, moving the streams ``moved`` (``recorded``: the
        events, when the writer here recorded them): wake every worker, soon."""
        if recorded and any(c.wants_recorded for c in self.connections):
            self._recorded += recorded
        for connection in self.connections:
            if connection is not origin:
                # Notices of several workers may arrive out of order: keep the latest.
                latest = connection.moved
                for stream_id, version in moved:
                    if latest.get(stream_id, 0) < version:
                        latest[stream_id] = version
        if not self._wake_pending:
            # Once per loop turn: every answer of a group commit goes out first, then
            # one wake-up per worker for all of them.
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_pending = False
        recorded, self._recorded = self._recorded, []
        events = b""
        if recorded:
            # Answers of one batch may complete out of order; positions are the writer's.
            recorded.sort(key=lambda event: event.position)
            events = encode_events(recorded)
        for connection in self.connections:
            moved, connection.moved = connection.moved, {}
            carried = events if connection.wants_recorded else b""
            if moved or carried:
                connection.send(frame((WAKE, (list(moved.items()), carried))))
            else:
                connection.send(self.idle_wake)

    def _group_deleted(self, name: str, created_at: dt.datetime) -> None:
        """Every worker's members of the group end (NOT_FOUND), not only the deleter's."""
        message = frame((GROUP_DELETED, (name, created_at)))
        for connection in self.connections:
            connection.send(message)

    async def close(self) -> None:
        """Close the writer's store (appends queued finish first), then the workers'
        connections: a worker still running sees the hub gone and stops."""
        self.closed = True
        if self._server is not None:
            self._server.close()
        if self.groups is not None:
            await self.groups.close()
        if self.writer is not None:
            await self.writer.close()
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()
