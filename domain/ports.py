"""The event store port: the neutral records the domain exchanges with any store.

A store never sees domain classes, only ``NewEvent``/``RecordedEvent`` with the payload
already serialised (``domain.mapper``), so every backend stores the same bytes and the
same bytes are reused for every reader.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event about to be appended; the store assigns its global position."""

    event_id: str
    stream_id: str
    stream_version: int
    event_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """A committed event exactly as stored."""

    event_id: str
    stream_id: str
    stream_version: int
    position: int
    occurred_at: dt.datetime
    command_id: str
    correlation_id: str
    user_id: str
    event_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Commit:
    """One command's events, appended atomically or not at all.

    ``expected_versions`` holds, for every stream the command touches, the version the
    command saw (0: the stream must not exist yet). ``fingerprint`` identifies the request
    for idempotency: the same ``command_id`` with another fingerprint is a different request.
    """

    command_id: str
    fingerprint: str
    correlation_id: str
    user_id: str
    occurred_at: dt.datetime
    expected_versions: Mapping[str, int]
    events: Sequence[NewEvent]


def recorded_events(commit: Commit, first_position: int) -> list[RecordedEvent]:
    """``commit``'s events as a store records them, at positions from ``first_position`` on.

    The time is the commit's, in UTC; every backend answers an append with these.
    """
    occurred_at = commit.occurred_at.astimezone(dt.UTC)
    command_id, correlation_id, user_id = commit.command_id, commit.correlation_id, commit.user_id
    return [
        RecordedEvent(
            event.event_id,
            event.stream_id,
            event.stream_version,
            position,
            occurred_at,
            command_id,
            correlation_id,
            user_id,
            event.event_type,
            event.data,
        )
        for position, event in enumerate(commit.events, start=first_position)
    ]


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """What the store remembers of a committed command, to replay it."""

    command_id: str
    fingerprint: str
    events: Sequence[RecordedEvent]


class EventStore(Protocol):
    """Append-only event storage with optimistic concurrency and idempotency records.

    Every backend passes the same conformance suite (``tests/conformance``).
    """

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        """Append all of ``commit.events`` and record the command, atomically.

        Raises ``ConcurrencyConflictError`` if any stream's version differs from
        ``expected_versions``, ``DuplicateCommandError`` if the command_id is already
        recorded, ``StoreError`` for anything else. Returns the events with their positions,
        in the commit's order, only once they are durable.
        """
        ...

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        """Events of one stream with ``stream_version > after_version``, in version order."""
        ...

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Up to ``limit`` events with ``position > after_position``, in position order.

        Never returns an event while an event with a lower position may still commit: a
        reader that has seen position N will never later find a new event below N.
        """
        ...

    async def head_position(self) -> int:
        """The highest committed position that ``read_all`` can return (0 when empty)."""
        ...

    async def find_command(self, command_id: str) -> CommandRecord | None:
        """The recorded command with its events, or None if it never committed."""
        ...

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` on the event loop whenever new events may be readable.

        Called after every local commit and, for a store shared by several processes
        (PostgreSQL), when another process commits. It is only a wake-up: listeners
        read ``read_all`` to find out what is new, so a lost wake-up only delays.
        """
        ...

    async def close(self) -> None:
        """Release connections and threads; pending appends finish first."""
        ...
