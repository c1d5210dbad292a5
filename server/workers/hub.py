"""The supervisor's hub: what the workers of one gateway tell each other.

**Commits across workers.** A worker's subscriptions, and the follower that keeps its
aggregate cache up to date (``cache_follower``), sleep until told that something
committed; with several workers they must hear of the others' commits. So every worker
tells the hub of each commit it made (a notice, with the commit's events), and once per
turn of its event loop the hub sends each *other* worker one wake-up: a local message,
not the 1 s poll. The wake-up carries the *other* workers' commits (their events): only
those can leave the worker's cache behind (at one caller, reading each own commit back
in every worker doubled the server CPU per call), and the worker's cache follower
applies them to the streams it holds without reading anything. A worker hears of its
own commits from its own store. The notices hurry (1 ms) only while another worker has
subscriptions to wake or commits too; otherwise they wait 20 ms for the commits after
them (``hub_client``), so that one busy worker does not wake the supervisor and the idle
workers once per call.

**SQLite.** Each worker writes the file itself, taking turns with the others at SQLite's
one write lock in the kernel (``server.stores.sqlite_turns``) rather than in SQLite's
busy handler, and group-commits what queued while it waited. The consumer groups'
records and partition leases are the supervisor's (``server.workers.groups``), and so
are the locks with which workers take turns at a contended stream (a hot product) rather
than race each other to concurrency conflicts (``server.workers.stream_locks``; on
PostgreSQL they are advisory locks in the database, as for replicas).
Handing every append to one writer in the supervisor instead was measured first: the
supervisor's hand-off and its one interpreter cost 0.4 to 0.5 ms of CPU per call, which
made two workers slower than one process on two cores.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from pathlib import Path
from typing import Any, cast

from server.workers.groups import GroupsHost
from server.workers.hub_protocol import (
    CONTENTION,
    GROUP_DELETED,
    LISTENING,
    LOCK_STREAM,
    NOTICE,
    OTHERS_LISTENING,
    UNLOCK_STREAM,
    WAKE,
    FrameBuffer,
    FrameWriter,
    GroupCall,
    encode_call_outcome,
    frame,
)
from server.workers.stream_locks import StreamLockTable

log = logging.getLogger("order_gateway.workers")


class _Connection(asyncio.Protocol):
    """One worker's connection."""

    def __init__(self, hub: WorkerHub) -> None:
        self._hub = hub
        self._buffer = FrameBuffer()
        self._out = FrameWriter()
        self.notices: list[bytes] = []
        """The other workers' commits since this worker's last wake-up."""
        self.replicas: set[str] = set()
        """The worker's consumer-group replica ids (its lease calls name them)."""
        self.listening = False
        """The worker has subscriptions."""
        self.told_others_listening = False
        """What the worker was last told of the others' subscriptions."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass).
        transport = cast(asyncio.Transport, transport)
        self._out.transport = transport
        if self._hub.closed:
            # Accepted as the hub was closing: this worker must learn it is gone too.
            transport.close()
            return
        self._hub.connections.add(self)
        # The worker waits for this first wake-up before it serves: it knows the hub has
        # taken its connection.
        transport.write(self._hub.idle_wake)
        self._hub.listeners_changed()

    def connection_lost(self, exc: Exception | None) -> None:
        self._hub.connections.discard(self)
        self._out.transport = None
        self._hub.listeners_changed()
        # A worker killed in its turn at a stream must not keep the others from it.
        self._hub.stream_locks.forget(self)
        if self._hub.groups is not None:
            # The worker is gone (a worker closes its connection last, after its groups
            # stopped): its partitions need not wait out their leases.
            self._hub.groups.forget(self.replicas)

    def data_received(self, data: bytes) -> None:
        for call_id, message in self._buffer.feed(data):
            if call_id == NOTICE:
                self._hub.committed(self, message)
            elif call_id == LISTENING:
                self.listening = bool(message)
                self._hub.listeners_changed()
            elif call_id == LOCK_STREAM:
                request_id, stream_id = message
                self._hub.stream_locks.lock(self, request_id, stream_id)
            elif call_id == UNLOCK_STREAM:
                self._hub.stream_locks.unlock(self, message)
            elif call_id == CONTENTION:
                self._hub.contention(self, message)
            else:
                self._group_call(call_id, message)

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


def _granted(connection: _Connection, request_id: int, waited: bool) -> None:
    connection.send(frame((request_id, ("ok", waited))))


class WorkerHub:
    """Serves the workers on a unix socket at ``path``; ``groups``: the consumer groups
    the supervisor keeps for them (SQLite)."""

    def __init__(self, path: Path, groups: GroupsHost | None = None) -> None:
        self.path = path
        self.groups = groups
        if groups is not None:
            groups.on_deleted = self._group_deleted
        self.connections: set[_Connection] = set()
        self.closed = False
        self._server: asyncio.Server | None = None
        self._wake_pending = False
        self.idle_wake = frame((WAKE, []))
        self.stream_locks: StreamLockTable[_Connection] = StreamLockTable(_granted)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), str(self.path))

    def committed(self, origin: _Connection, notice: bytes) -> None:
        """``origin``'s worker committed (``notice``: the events, encoded): wake the other
        workers, soon."""
        for connection in self.connections:
            if connection is not origin:
                connection.notices.append(notice)
        if not self._wake_pending:
            # Once per loop turn: one wake-up per worker for all the notices read.
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._wake)

    def contention(self, origin: _Connection, stream_id: str) -> None:
        """``origin``'s worker takes turns at ``stream_id``: so must the others, or one
        that keeps winning the race would never lose one to learn it."""
        message = frame((CONTENTION, stream_id))
        for connection in self.connections:
            if connection is not origin:
                connection.send(message)

    def listeners_changed(self) -> None:
        """Tell each worker whether another worker has subscriptions, when that changed:
        only then must its notices hurry for them (``hub_client``)."""
        listening = [connection for connection in self.connections if connection.listening]
        for connection in self.connections:
            others = any(other is not connection for other in listening)
            if others != connection.told_others_listening:
                connection.told_others_listening = others
                connection.send(frame((OTHERS_LISTENING, others)))

    def _wake(self) -> None:
        self._wake_pending = False
        for connection in self.connections:
            if connection.notices:
                notices, connection.notices = connection.notices, []
                connection.send(frame((WAKE, notices)))

    def _group_deleted(self, name: str, created_at: dt.datetime) -> None:
        """Every worker's members of the group end (NOT_FOUND), not only the deleter's."""
        message = frame((GROUP_DELETED, (name, created_at)))
        for connection in self.connections:
            connection.send(message)

    async def close(self) -> None:
        """Close the groups' store, then the workers' connections: a worker still
        running sees the hub gone and stops."""
        self.closed = True
        if self._server is not None:
            self._server.close()
        if self.groups is not None:
            await self.groups.close()
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()
