"""An in-memory event store with the full semantics of the durable ones (for tests).

All state changes happen under one lock with no await inside, so an append is atomic
for coroutines and threads alike.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from domain.errors import ConcurrencyConflictError, DuplicateCommandError
from domain.ports import (
    CommandRecord,
    Commit,
    EventPayload,
    RecordedEvent,
    Snapshot,
    event_payload,
    recorded_events,
)
from server.consumer_groups.store_memory import MemoryConsumerGroupStore


class MemoryEventStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[RecordedEvent] = []
        self._streams: dict[str, list[RecordedEvent]] = {}
        self._commands: dict[str, CommandRecord] = {}
        self._listeners: list[Callable[[], None]] = []
        self._snapshots: dict[str, Snapshot] = {}
        self._groups = MemoryConsumerGroupStore()

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        with self._lock:
            if commit.command_id in self._commands:
                raise DuplicateCommandError(commit.command_id)
            for stream_id, expected in commit.expected_versions.items():
                if len(self._streams.get(stream_id, ())) != expected:
                    raise ConcurrencyConflictError(f"{stream_id} is not at version {expected}")
            for stream_id, event_id in commit.follows.items():
                stream = self._streams.get(stream_id)
                if not stream or stream[-1].event_id != event_id:
                    raise ConcurrencyConflictError(f"{stream_id} has moved on from {event_id}")
            recorded = recorded_events(commit, first_position=len(self._events) + 1)
            for event in recorded:
                self._events.append(event)
                self._streams.setdefault(event.stream_id, []).append(event)
            self._commands[commit.command_id] = CommandRecord(
                commit.command_id, commit.fingerprint, tuple(recorded)
            )
        for listener in self._listeners:
            listener()
        return recorded

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        with self._lock:
            return self._streams.get(stream_id, [])[after_version:]

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        with self._lock:
            return self._events[after_position : after_position + limit]

    async def head_position(self) -> int:
        with self._lock:
            return len(self._events)

    async def find_command(self, command_id: str) -> CommandRecord | None:
        with self._lock:
            return self._commands.get(command_id)

    async def find_command_ranges(self, command_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        with self._lock:
            records = [self._commands[c] for c in command_ids if c in self._commands]
        return {r.command_id: (r.events[0].position, len(r.events)) for r in records if r.events}

    async def read_command_records(
        self, after_command_id: str, limit: int
    ) -> list[tuple[str, int, int, str]]:
        with self._lock:
            later = sorted(c for c in self._commands if c > after_command_id)[:limit]
            records = [self._commands[c] for c in later]
        # A command without events points nowhere: position 0, which verify reports.
        return [
            (r.command_id, r.events[0].position if r.events else 0, len(r.events), r.fingerprint)
            for r in records
        ]

    async def repeated_event_ids(self, head: int, limit: int) -> list[tuple[str, list[int]]]:
        with self._lock:
            events = self._events[:head]
        positions: dict[str, list[int]] = {}
        for event in events:
            positions.setdefault(event.event_id, []).append(event.position)
        repeated = [(event_id, at) for event_id, at in positions.items() if len(at) > 1]
        return sorted(repeated, key=lambda found: found[1][0])[:limit]

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        with self._lock:
            return self._snapshots.get(stream_id)

    async def load_snapshot_and_events(
        self, stream_id: str
    ) -> tuple[Snapshot | None, list[EventPayload]]:
        snapshot = await self.load_snapshot(stream_id)
        after = snapshot.stream_version if snapshot is not None else 0
        # Through read_stream, so that a test's store that overrides it sees every read.
        return snapshot, [event_payload(r) for r in await self.read_stream(stream_id, after)]

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        with self._lock:
            kept = self._snapshots.get(snapshot.stream_id)
            if kept is None or kept.stream_version < snapshot.stream_version:
                self._snapshots[snapshot.stream_id] = snapshot

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    async def open_consumer_groups(self) -> MemoryConsumerGroupStore:
        """Consumer-group records beside the events (``server.consumer_groups``), kept
        with this store so that a gateway restarted on it finds its groups again."""
        return self._groups

    async def close(self) -> None:
        return None
