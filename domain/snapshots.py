"""Snapshots: a long stream's aggregate rebuilt from its latest snapshot plus the events
after it, instead of from its first event.

A snapshot is taken after a commit that carries an aggregate's stream across a multiple
of ``interval`` events, from the state the commit left in memory, and written in the
background: a command never waits for it, and a snapshot that fails to be written only
means a longer replay later (it is logged). They are written one at a time, the latest of
each stream, at most ``MAX_PENDING`` waiting: a write the store holds up (on PostgreSQL,
another session's lock on the snapshots table) then holds one connection, where writes
started side by side had taken every pooled connection, and the commands that needed one
to read waited for the lock too. Only aggregates that declare a
``SNAPSHOT_VERSION`` are snapshotted; a snapshot in another version is ignored.

A snapshot is sealed with a digest of its stream, version and state: one that does not
match (a damaged file or row), or whose state cannot be read, is ignored as well, and the
stream replayed from its first event. The events are the record; a snapshot only saves
reading them, and a damaged one read as it is could sell stock the events never had.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Iterable
from typing import Any, TypeVar

from domain.aggregates import Aggregate
from domain.errors import StoreError
from domain.mapper import UNDECODABLE, decode_all, to_domain_event
from domain.ports import EventStore, RecordedEvent, Snapshot, SnapshotStore

log = logging.getLogger("order_gateway.snapshots")

A = TypeVar("A", bound=Aggregate)

DEFAULT_INTERVAL = 25
"""Chosen by measurement. The first command on a long stream after a restart replays up
to ``interval - 1`` events after the snapshot; the events it does not replay are the one
cost of a cold start the interval moves. On PostgreSQL, cold minus warm order, in
process, the intervals' restarts taking turns (60 each, load average under 1.2): 0.44 ms
of CPU and 0.75 ms of latency at 50, 0.35 and 0.57 at 25, 0.33 and 0.52 at 10; the whole
first order 1.93, 1.70 and 1.62 x a warm one. Whole runs of ``python -m bench`` (stream-
length section) put 25 below 50 in five runs of six. A snapshot write costs ~0.09 ms on
SQLite and ~0.3 ms plus a WAL flush on PostgreSQL, in the background: at 25, about 2 % of
a hot product's ~0.6 ms order, and the warm orders' mean latency while snapshots are taken
did not tell 25 from 50 (``python -m bench``). 10 gains little more for 2.5 x the writes."""


def _digest(stream_id: str, version: int, schema_version: int, state: bytes) -> bytes:
    bound = f"{stream_id}\0{version}\0{schema_version}\0".encode()
    return hashlib.sha256(bound + state).hexdigest().encode()


def sealed(stream_id: str, version: int, schema_version: int, state: dict[str, Any]) -> Snapshot:
    """The snapshot of ``state``: its JSON after the hex digest that ``opened`` checks."""
    data = json.dumps(state).encode()
    return Snapshot(
        stream_id,
        version,
        schema_version,
        _digest(stream_id, version, schema_version, data) + b" " + data,
    )


def opened(snapshot: Snapshot) -> dict[str, Any] | None:
    """The state ``snapshot`` was sealed with, or None if it is not what was sealed."""
    if not isinstance(snapshot.data, bytes):
        return None  # e.g. a row edited by hand to hold text, which SQLite returns as str
    digest, space, data = snapshot.data.partition(b" ")
    if not space or digest != _digest(
        snapshot.stream_id, snapshot.stream_version, snapshot.schema_version, data
    ):
        return None
    try:
        state = json.loads(data)
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def _replayed(blank: A, records: list[RecordedEvent]) -> tuple[A, str]:
    blank.replay([to_domain_event(record) for record in records])
    return blank, records[-1].event_id if records else ""


def _restored(blank: Aggregate, state: dict[str, Any], version: int) -> bool:
    """Whether ``blank`` took ``state``: a sealed state it cannot read is as damaged."""
    try:
        blank.restore_state(state, version)
    except (KeyError, TypeError, ValueError):
        return False
    return True


MAX_PENDING = 1_000
"""Snapshots waiting to be written, each the latest of its stream; beyond it the oldest
is dropped (its stream's next snapshot comes ``interval`` events later)."""


class Snapshots:
    """Loads and takes the snapshots of one process's aggregates."""

    def __init__(self, store: SnapshotStore | None, interval: int) -> None:
        self._store = store if interval > 0 else None
        self._interval = interval
        self._pending: dict[str, Snapshot] = {}
        """By stream, in the order taken: the next to write first."""
        self._writer: asyncio.Task[None] | None = None

    async def load(self, blank: A, events: EventStore) -> tuple[A, str]:
        """``blank`` rebuilt from its latest usable snapshot and the events after it (from
        its whole stream when there is none), and the id of the last event replayed ("":
        none). One read of the store where it can: on a cold start each round trip more
        costs about as much as the rest of the command."""
        if self._store is None or not blank.SNAPSHOT_VERSION:
            return _replayed(blank, await events.read_stream(blank.stream_id))
        try:
            snapshot, payloads = await self._store.load_snapshot_and_events(blank.stream_id)
        except StoreError as error:
            # E.g. a role without rights on the snapshots table: slower, not broken.
            log.warning("snapshot of %s not read: %s", blank.stream_id, error)
            return _replayed(blank, await events.read_stream(blank.stream_id))
        if snapshot is not None:
            if snapshot.schema_version != blank.SNAPSHOT_VERSION:
                return _replayed(blank, await events.read_stream(blank.stream_id))
            state = opened(snapshot)
            if state is None or not _restored(blank, state, snapshot.stream_version):
                log.warning(
                    "snapshot of %s at version %d is damaged: ignored, the stream is replayed"
                    " from its first event (the next snapshot replaces it)",
                    blank.stream_id,
                    snapshot.stream_version,
                )
                return _replayed(type(blank)(blank.id), await events.read_stream(blank.stream_id))
        try:
            decoded = decode_all(payloads)
        except UNDECODABLE:
            # Payloads carry no position: the same events read again as records, which
            # do, so that the error names the one that does not decode. Rare, and the
            # command fails anyway.
            after = 0 if snapshot is None else snapshot.stream_version
            return _replayed(blank, await events.read_stream(blank.stream_id, after))
        blank.replay(decoded)
        return blank, payloads[-1][0] if payloads else ""

    def due(self, aggregate: Aggregate, from_version: int) -> Snapshot | None:
        """The snapshot to take if ``aggregate``'s pending events, which follow
        ``from_version``, carry its stream across a multiple of the interval."""
        if (
            self._store is None
            or not aggregate.SNAPSHOT_VERSION
            or aggregate.version // self._interval == from_version // self._interval
        ):
            return None
        return sealed(
            aggregate.stream_id,
            aggregate.version,
            aggregate.SNAPSHOT_VERSION,
            aggregate.snapshot_state(),
        )

    def take(self, snapshots: Iterable[Snapshot]) -> None:
        """Write ``snapshots`` in the background. Only for states that are durable: a
        pipelined commit may still fail, and a snapshot of it would be read as history."""
        if self._store is None:
            return
        for snapshot in snapshots:
            # A later one of the stream replaces the one waiting, and waits its turn anew.
            self._pending.pop(snapshot.stream_id, None)
            self._pending[snapshot.stream_id] = snapshot
        while len(self._pending) > MAX_PENDING:
            del self._pending[next(iter(self._pending))]
        if self._writer is None and self._pending:
            self._writer = asyncio.get_running_loop().create_task(self._write(self._store))

    async def _write(self, store: SnapshotStore) -> None:
        try:
            while self._pending:
                stream_id = next(iter(self._pending))
                await self._save(store, self._pending.pop(stream_id))
        finally:
            self._writer = None

    @staticmethod
    async def _save(store: SnapshotStore, snapshot: Snapshot) -> None:
        try:
            await store.save_snapshot(snapshot)
        except StoreError as error:
            # The store's own account (unavailable for a moment, full): its cause is logged
            # where the store's faults are, and a lost snapshot only means a longer replay.
            log.warning("snapshot of %s not saved: %s", snapshot.stream_id, error)
        except Exception:
            log.warning("snapshot of %s not saved", snapshot.stream_id, exc_info=True)

    async def drain(self) -> None:
        """Wait for the snapshots taken to be written (before the store closes)."""
        while self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
