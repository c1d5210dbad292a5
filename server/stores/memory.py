"""An in-memory event store with the full semantics of the durable ones (for tests).

All state changes happen under one lock with no await inside, so an append is atomic
for coroutines and threads alike.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from domain.errors import ConcurrencyConflictError, DuplicateCommandError
from domain.ports import CommandRecord, Commit, RecordedEvent, recorded_events


class MemoryEventStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[RecordedEvent] = []
        self._streams: dict[str, list[RecordedEvent]] = {}
        self._commands: dict[str, CommandRecord] = {}
        self._listeners: list[Callable[[], None]] = []

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

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    async def close(self) -> None:
        return None
