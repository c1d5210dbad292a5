"""Snapshots: a long stream's aggregate rebuilt from its latest snapshot plus the events
after it, instead of from its first event.

A snapshot is taken after a commit that carries an aggregate's stream across a multiple
of ``interval`` events, from the state the commit left in memory, and written in the
background: a command never waits for it, and a snapshot that fails to be written only
means a longer replay later (it is logged). Only aggregates that declare a
``SNAPSHOT_VERSION`` are snapshotted; a snapshot in another version is ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from typing import TypeVar

from domain.aggregates import Aggregate
from domain.errors import StoreError
from domain.mapper import decode_all, to_domain_event
from domain.ports import EventStore, RecordedEvent, Snapshot, SnapshotStore

log = logging.getLogger("order_gateway.snapshots")

A = TypeVar("A", bound=Aggregate)

DEFAULT_INTERVAL = 50
"""Measured (``python -m bench``, stream-length section: a 100,000-event product, its
snapshot 49 events behind, the worst case): the first order after a restart took
1.9-4.2 ms against 0.66-1.6 ms for a warm one (2.6-3.0 x) and 2.5-5.3 s without
snapshots. Intervals of 10 and 25 measured the same: what is left is one read of the
store and decoding the events after the snapshot. Larger ones read more (100: 5.5 x).
A snapshot is one small row replaced every 50 events of a product."""


def _replayed(blank: A, records: list[RecordedEvent]) -> tuple[A, str]:
    blank.replay([to_domain_event(record) for record in records])
    return blank, records[-1].event_id if records else ""


class Snapshots:
    """Loads and takes the snapshots of one process's aggregates."""

    def __init__(self, store: SnapshotStore | None, interval: int) -> None:
        self._store = store if interval > 0 else None
        self._interval = interval
        self._writing: set[asyncio.Task[None]] = set()

    async def load(self, blank: A, events: EventStore) -> tuple[A, str]:
        """``blank`` rebuilt from its latest usable snapshot and the events after it (from
        its whole stream when there is none), and the id of the last event replayed ("":
        none). One read of the store where it can: on a cold start each round trip more
        costs about as much as the rest of the command."""
        if self._store is None or not blank.SNAPSHOT_VERSION:
            return _replayed(blank, await events.read_stream(blank.stream_id))
        try:
            snapshot, payloads = await self._store.load_snapshot_and_events(blank.stream_id)
        except StoreError:
            # E.g. a role without rights on the snapshots table: slower, not broken.
            log.warning("snapshot of %s not read", blank.stream_id, exc_info=True)
            return _replayed(blank, await events.read_stream(blank.stream_id))
        if snapshot is not None:
            if snapshot.schema_version != blank.SNAPSHOT_VERSION:
                return _replayed(blank, await events.read_stream(blank.stream_id))
            blank.restore_state(json.loads(snapshot.data), snapshot.stream_version)
        blank.replay(decode_all(payloads))
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
        return Snapshot(
            aggregate.stream_id,
            aggregate.version,
            aggregate.SNAPSHOT_VERSION,
            json.dumps(aggregate.snapshot_state()).encode(),
        )

    def take(self, snapshots: Iterable[Snapshot]) -> None:
        """Write ``snapshots`` in the background. Only for states that are durable: a
        pipelined commit may still fail, and a snapshot of it would be read as history."""
        if self._store is None:
            return
        for snapshot in snapshots:
            task = asyncio.get_running_loop().create_task(self._save(self._store, snapshot))
            self._writing.add(task)
            task.add_done_callback(self._writing.discard)

    @staticmethod
    async def _save(store: SnapshotStore, snapshot: Snapshot) -> None:
        try:
            await store.save_snapshot(snapshot)
        except Exception:
            log.warning("snapshot of %s not saved", snapshot.stream_id, exc_info=True)

    async def drain(self) -> None:
        """Wait for the snapshots being written (before the store closes)."""
        while self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)
