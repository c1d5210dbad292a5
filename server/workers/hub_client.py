"""A worker's side of its supervisor's hub (``server.workers.hub``), and its store.

``WorkerStore`` wraps the store the worker opened itself, which it reads and appends to
(on SQLite taking turns with the other workers at the file's write lock:
``server.stores.sqlite_turns``); after each commit it tells the hub, with the commit's events.
The hub's wake-ups, which say that other workers committed, call the store's commit
listeners (on PostgreSQL beside its LISTEN/NOTIFY) and ``on_others`` with those commits
(the aggregate cache's follower). Workers take turns at contended streams like replicas
(``domain.ports.SharedStreamLocks``): with PostgreSQL's advisory locks
(``LockingWorkerStore``), or with the supervisor's where the store has none (SQLite:
``HubLockingWorkerStore``, ``server.workers.stream_locks``).

If the supervisor goes away, ``lost`` is set: the worker stops (``server.workers.worker``).
Its consumer-group calls fail as ``StoreUnavailableError`` (the groups' records are out of
reach), and its requests for a stream's lock as ``ServerStoppingError``: a command waiting
for its turn at a hot product can no longer get it, and is answered as a stopping server
answers, while the commands that need no turn finish (the worker reads and writes the
SQLite file itself). Neither is a fault of the event store's.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

from domain.errors import StoreError, StoreUnavailableError
from domain.ports import (
    CommandRecord,
    Commit,
    EventPayload,
    EventStore,
    RecordedEvent,
    SharedStreamLocks,
    Snapshot,
    SnapshotStore,
    StreamLocked,
)
from server.consumer_groups.ports import ConsumerGroupStore
from server.consumer_groups.stores import KeepsConsumerGroups
from server.stopping import ServerStoppingError
from server.stores.event_rows import EventRow, EventRowReader, StreamRowReader
from server.stores.on_loop import CommitsOnLoop
from server.workers.groups import WorkerGroupStore
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
    Outcome,
    decode_call_outcome,
    encode_events,
    frame,
)

log = logging.getLogger("order_gateway.workers")

CONNECT_TIMEOUT_SECONDS: Final = 30.0
GONE: Final = "the gateway's supervisor process is gone"
NOTICE_DELAY_SECONDS: Final = 0.001
"""A notice waits this long for the next: the supervisor and the other workers wake once
for several commits, and after the answers, not beside them."""
FOLLOW_ONLY_NOTICE_DELAY_SECONDS: Final = 0.005
"""The wait where the other workers' subscriptions are woken by the store itself
(PostgreSQL's LISTEN, which delivers a commit to every worker as it happens): the notices
then only keep their caches up to date, which a few milliseconds more cannot harm (a
cache left behind costs a conflict and a read, and the race a conflict needs is as wide
as an append's own latency). At one caller a call takes 2 to 3 ms on PostgreSQL, so the
supervisor and the other worker then wake once for two or three calls instead of each:
measured, those wake-ups cost 0.13-0.2 ms (supervisor) and 0.3-0.4 ms (the other worker)
of CPU per call there, beside 1.9-2.5 ms in the worker serving the calls."""
QUIET_NOTICE_DELAY_SECONDS: Final = 0.02
"""The wait while no other worker has subscriptions and none has committed for
``OTHERS_ACTIVE_SECONDS``: the notices then only keep idle caches up to date. With one
worker serving a single caller on SQLite, the wake-ups at the 1 ms pace cost the
supervisor 0.13-0.16 ms and the idle worker 0.16-0.23 ms of CPU per call, on the cores
the serving worker and its clients need; at this pace, 0.02-0.04 and 0.05-0.08 ms. A
worker that starts serving decides its first commands on a cache up to this much behind
(a conflict and a read where the other worker changed a stream meanwhile), and its
notices then make the others hurry too."""
OTHERS_ACTIVE_SECONDS: Final = 1.0
"""How long after the last notice of another worker this worker's notices hurry."""


class RowStore(EventStore, EventRowReader, StreamRowReader, Protocol):
    """A store that also reads rows (SQLite's and PostgreSQL's)."""


class LockingRowStore(RowStore, SharedStreamLocks, Protocol):
    """A ``RowStore`` with shared stream locks (PostgreSQL's)."""


class _HubConnection(asyncio.Protocol):
    def __init__(self, client: HubClient) -> None:
        self._client = client
        self._buffer = FrameBuffer()
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done at the hub's first wake-up, sent when it has taken the connection."""

    def data_received(self, data: bytes) -> None:
        for call_id, message in self._buffer.feed(data):
            if call_id == WAKE:
                if not self.accepted.done():
                    self.accepted.set_result(None)
                self._client.woken(message)
            elif call_id == GROUP_DELETED:
                self._client.group_deleted(*message)
            elif call_id == OTHERS_LISTENING:
                self._client.others_listening(bool(message))
            elif call_id == CONTENTION:
                self._client.contended_elsewhere(message)
            else:
                self._client.answer(call_id, message)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(StoreUnavailableError(GONE))
        self._client.hub_lost()


class HubClient:
    """The connection to the hub."""

    def __init__(self, notice_delay: float = NOTICE_DELAY_SECONDS) -> None:
        self._notice_delay = notice_delay
        self.on_others: Callable[[list[bytes]], None] | None = None
        """Called with the other workers' commits (``hub_protocol.encode_events``)."""
        self.on_group_deleted: Callable[[str, dt.datetime], None] | None = None
        """Called with a consumer group's name and creation time once it is deleted
        (on SQLite, from any worker)."""
        self._out = FrameWriter()
        self._notices: list[bytes] = []
        """Notices waiting for their delay to pass."""
        self._sending: asyncio.TimerHandle | None = None
        self._others_listening = False
        """Another worker has subscriptions, which this worker's notices wake."""
        self._others_committed_at = float("-inf")
        """When this worker last heard of another worker's commit (event loop time)."""
        self._calls: dict[int, asyncio.Future[Outcome]] = {}
        """Consumer-group calls waiting for their answer."""
        self._lock_requests: dict[int, asyncio.Future[Outcome]] = {}
        """Requests for a stream's lock waiting for it."""
        self._ids = itertools.count(WAKE + 1)
        self._listeners: list[Callable[[], None]] = []
        self._contention_listeners: list[Callable[[str], None]] = []
        self._closing = False
        """This worker closes the connection itself (it is stopping): its end is no loss."""
        self.lost = asyncio.Event()
        """Set when the connection ends other than by ``close``: the supervisor is gone."""

    @classmethod
    async def connect(
        cls, socket_path: str | Path, notice_delay: float = NOTICE_DELAY_SECONDS
    ) -> HubClient:
        """``notice_delay``: how long a notice waits for the commits after it."""
        client = cls(notice_delay)
        transport, connection = await asyncio.get_running_loop().create_unix_connection(
            lambda: _HubConnection(client), str(socket_path)
        )
        client._out.transport = transport
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                await connection.accepted
        except BaseException:
            transport.close()
            raise
        return client

    def _send(self, message: object) -> None:
        """Written at the end of this turn of the loop, with the turn's other frames."""
        if not self._out.open:
            raise StoreUnavailableError(GONE)
        self._out.send(frame(message))

    async def call(self, method: str, *args: Any) -> Any:
        """A consumer-group call of the supervisor (``server.workers.groups``)."""
        call_id = next(self._ids)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._send((call_id, GroupCall(method, args)))
        self._calls[call_id] = future
        try:
            return decode_call_outcome(await future)
        finally:
            self._calls.pop(call_id, None)

    async def lock_stream(self, stream_id: str) -> bool:
        """Wait until this worker holds the supervisor's lock on ``stream_id``; returns
        whether another worker held it first. Raises ``ServerStoppingError`` once the
        supervisor is gone (this worker is stopping)."""
        if not self._out.open:
            raise ServerStoppingError(GONE)
        request_id = next(self._ids)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._send((LOCK_STREAM, (request_id, stream_id)))
        self._lock_requests[request_id] = future
        try:
            waited = decode_call_outcome(await future)
        except BaseException:
            # Given up (a deadline) or failed: the lock may have been granted meanwhile,
            # and the hub releases it, or forgets the request if it was not.
            self.unlock_stream(stream_id)
            raise
        finally:
            self._lock_requests.pop(request_id, None)
        return bool(waited)

    def unlock_stream(self, stream_id: str) -> None:
        """Release the lock (a lost hub has released every lock of this worker)."""
        if self._out.open:
            self._send((UNLOCK_STREAM, stream_id))

    def announce_contention(self, stream_id: str) -> None:
        """Tell the other workers that this one takes turns at ``stream_id`` now (a lost
        hub: they are stopping too)."""
        if self._out.open:
            self._send((CONTENTION, stream_id))

    def add_contention_listener(self, listener: Callable[[str], None]) -> None:
        self._contention_listeners.append(listener)

    def contended_elsewhere(self, stream_id: str) -> None:
        for listener in list(self._contention_listeners):
            try:
                listener(stream_id)
            except Exception:
                log.exception("contention listener failed")

    def notice(self, commit: Commit) -> None:
        """This worker committed ``commit`` (a lost hub only delays the others)."""
        if not self._out.open:
            return
        self._notices.append(frame((NOTICE, encode_events(commit.events))))
        if len(self._notices) == 1:
            loop = asyncio.get_running_loop()
            self._sending = loop.call_later(self._delay(), self._send_notices)

    @property
    def hurrying(self) -> bool:
        """Whether this worker's notices go out at the short delay now: another worker
        has subscriptions, or committed within ``OTHERS_ACTIVE_SECONDS``."""
        now = asyncio.get_running_loop().time()
        return self._others_listening or now - self._others_committed_at < OTHERS_ACTIVE_SECONDS

    def _delay(self) -> float:
        if self.hurrying:
            return self._notice_delay
        return max(self._notice_delay, QUIET_NOTICE_DELAY_SECONDS)

    def listening(self, subscribed: bool) -> None:
        """Whether this worker has subscriptions now, which the others' notices wake."""
        if self._out.open:
            self._send((LISTENING, subscribed))

    def others_listening(self, listening: bool) -> None:
        self._others_listening = listening
        if listening and self._notices:
            # A new subscriber elsewhere must not wait out a quiet delay.
            self._send_notices()

    def _send_notices(self) -> None:
        if self._sending is not None:
            self._sending.cancel()
            self._sending = None
        notices, self._notices = self._notices, []
        if self._out.transport is not None and not self._out.transport.is_closing():
            self._out.transport.write(b"".join(notices))

    def answer(self, call_id: int, outcome: Outcome) -> None:
        called = self._calls.pop(call_id, None)
        if called is None:
            called = self._lock_requests.pop(call_id, None)
        if called is not None and not called.done():
            called.set_result(outcome)

    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def woken(self, notices: list[bytes]) -> None:
        if notices:
            self._others_committed_at = asyncio.get_running_loop().time()
            if self.on_others is not None:
                self.on_others(notices)
        for listener in self._listeners:
            listener()

    def group_deleted(self, name: str, created_at: dt.datetime) -> None:
        if self.on_group_deleted is not None:
            self.on_group_deleted(name, created_at)

    def hub_lost(self) -> None:
        self._out.transport = None
        calls, self._calls = self._calls, {}
        for called in calls.values():
            if not called.done():
                called.set_exception(StoreUnavailableError(GONE))
        requests, self._lock_requests = self._lock_requests, {}
        for requested in requests.values():
            if not requested.done():
                requested.set_exception(ServerStoppingError(GONE))
        # Not logged here: the worker says once that its supervisor is gone, whether the
        # lifeline or this connection tells it first. Its own close is no loss.
        if not self._closing:
            self.lost.set()

    async def close(self) -> None:
        # Notices still waiting go out first: the others' caches should not miss a
        # stopping worker's last commits (the transport sends what it holds, then closes).
        self._send_notices()
        self._closing = True
        transport, self._out.transport = self._out.transport, None
        if transport is not None:
            transport.close()


class WorkerStore:
    """The store of a worker: ``inner``, and the hub for news of the other workers'
    commits and (``groups_via_hub``: SQLite) the consumer groups."""

    def __init__(self, inner: RowStore, hub: HubClient, groups_via_hub: bool) -> None:
        self._inner = inner
        self._hub = hub
        self._groups_via_hub = groups_via_hub
        self._closing = False

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        if self._closing:
            raise StoreError("the store is closed")
        recorded = await self._inner.append(commit)
        self._hub.notice(commit)
        return recorded

    def commit_on_loop_when(self, alone: Callable[[], bool]) -> None:
        if isinstance(self._inner, CommitsOnLoop):
            self._inner.commit_on_loop_when(alone)

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        return await self._inner.read_stream(stream_id, after_version)

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        return await self._inner.read_all(after_position, limit)

    async def read_all_rows(self, after_position: int = 0, limit: int = 1000) -> list[EventRow]:
        return await self._inner.read_all_rows(after_position, limit)

    async def read_stream_rows_after(
        self, stream_id: str, after_position: int, limit: int
    ) -> tuple[list[EventRow], int]:
        return await self._inner.read_stream_rows_after(stream_id, after_position, limit)

    async def head_position(self) -> int:
        return await self._inner.head_position()

    async def find_command(self, command_id: str) -> CommandRecord | None:
        return await self._inner.find_command(command_id)

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        return await self._snapshots().load_snapshot(stream_id)

    async def load_snapshot_and_events(
        self, stream_id: str
    ) -> tuple[Snapshot | None, list[EventPayload]]:
        return await self._snapshots().load_snapshot_and_events(stream_id)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Straight to the file or database: a snapshot is no event, and on SQLite its
        small transaction on a connection of its own is no group commit's business."""
        await self._snapshots().save_snapshot(snapshot)

    def _snapshots(self) -> SnapshotStore:
        if not isinstance(self._inner, SnapshotStore):
            raise StoreError(f"{type(self._inner).__name__} keeps no snapshots")
        return self._inner

    async def open_consumer_groups(self) -> ConsumerGroupStore:
        """The groups, shared by the workers: on PostgreSQL as by replicas (partition
        leases in the database); on SQLite through the supervisor, which keeps the
        leases and writes the records (``server.workers.groups``)."""
        if not isinstance(self._inner, KeepsConsumerGroups):
            raise StoreError(f"{type(self._inner).__name__} keeps no consumer groups")
        records = await self._inner.open_consumer_groups()
        return WorkerGroupStore(records, self._hub) if self._groups_via_hub else records

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        self._hub.add_listener(listener)
        self._inner.add_commit_listener(listener)

    async def close(self) -> None:
        """Appends in flight are answered (and noticed) first; new ones are refused."""
        self._closing = True
        await self._inner.close()
        await self._hub.close()


class HubLockingWorkerStore(WorkerStore):
    """A ``WorkerStore`` on a store without shared stream locks (SQLite): workers take
    turns at contended streams with the supervisor's locks (``server.workers.stream_locks``).

    Without them, workers deciding orders on one product at once raced to the same
    version, the losers' commands and every command pipelined behind them ran again, and
    with enough callers some ran out of retries (ABORTED): two workers on one hot product
    answered ABORTED to about 1 % of the orders at 32 concurrent callers, with a p99 of a
    quarter of a second.
    """

    async def lock_stream(self, stream_id: str, after_version: int | None = None) -> StreamLocked:
        waited = await self._hub.lock_stream(stream_id)
        if after_version is None:
            return StreamLocked(waited)
        try:
            # Whoever held the lock before ended its turn once its commits were durable,
            # so a read that begins now sees them.
            events = await self._inner.read_stream(stream_id, after_version)
        except BaseException:
            self._hub.unlock_stream(stream_id)
            raise
        return StreamLocked(waited, events)

    async def unlock_stream(self, stream_id: str) -> None:
        self._hub.unlock_stream(stream_id)

    async def announce_contention(self, stream_id: str) -> None:
        self._hub.announce_contention(stream_id)

    def add_contention_listener(self, listener: Callable[[str], None]) -> None:
        self._hub.add_contention_listener(listener)


class LockingWorkerStore(WorkerStore):
    """A ``WorkerStore`` on a store with shared stream locks (PostgreSQL): workers take
    turns at contended streams like replicas (``domain.ports.SharedStreamLocks``)."""

    def __init__(self, inner: LockingRowStore, hub: HubClient, groups_via_hub: bool) -> None:
        super().__init__(inner, hub, groups_via_hub)
        self._locks = inner

    async def lock_stream(self, stream_id: str, after_version: int | None = None) -> StreamLocked:
        return await self._locks.lock_stream(stream_id, after_version)

    async def unlock_stream(self, stream_id: str) -> None:
        await self._locks.unlock_stream(stream_id)

    async def announce_contention(self, stream_id: str) -> None:
        await self._locks.announce_contention(stream_id)

    def add_contention_listener(self, listener: Callable[[str], None]) -> None:
        self._locks.add_contention_listener(listener)
