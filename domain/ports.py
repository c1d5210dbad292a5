"""The event store port: the neutral records the domain exchanges with any store.

A store never sees domain classes, only ``NewEvent``/``RecordedEvent`` with the payload
already serialised (``domain.mapper``), so every backend stores the same bytes and the
same bytes are reused for every reader.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from typing import Protocol, runtime_checkable

from domain.records import record


@record
class NewEvent:
    """An event about to be appended; the store assigns its global position."""

    event_id: str
    stream_id: str
    stream_version: int
    event_type: str
    data: bytes
    schema_version: int = 1
    """The version of ``event_type``'s payload shape that ``data`` is in."""


@record
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
    schema_version: int = 1
    """As stored: the payload may be older than the event's current shape (events stored
    before versions were recorded read as 1). ``domain.mapper`` upcasts on reading."""


@record
class Commit:
    """One command's events, appended atomically or not at all.

    ``expected_versions`` holds, for every stream the command touches, the version the
    command saw (0: the stream must not exist yet). ``follows`` holds, for streams of
    ``expected_versions`` the command saw events on, the id of the last of them: the
    commit also conflicts if that is not the stream's last event. A version alone names
    a state only while every state at that version is the committed one; a process that
    decides a command on the state a queued commit will leave (``domain.unit_of_work``)
    can hold a state that never commits, and another writer may fill its version with
    other events. ``fingerprint`` identifies the request for idempotency: the same
    ``command_id`` with another fingerprint is a different request.
    ``server_chose_id``: the caller sent no command id and the server drew this one just
    now, so nothing can be recorded under it yet and a store need not look it up. It is
    recorded all the same: the caller learns it from the answer and may retry with it.
    """

    command_id: str
    fingerprint: str
    correlation_id: str
    user_id: str
    occurred_at: dt.datetime
    expected_versions: Mapping[str, int]
    events: Sequence[NewEvent]
    follows: Mapping[str, str] = field(default_factory=dict)
    server_chose_id: bool = False


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
            event.schema_version,
        )
        for position, event in enumerate(commit.events, start=first_position)
    ]


@record
class CommandRecord:
    """What the store remembers of a committed command, to replay it."""

    command_id: str
    fingerprint: str
    events: Sequence[RecordedEvent]


@record
class Snapshot:
    """An aggregate's state as of ``stream_version`` of its stream, serialised.

    ``schema_version`` is the shape of ``data``: a snapshot in another shape than the
    aggregate's current one is ignored (the stream is replayed instead), never misread.
    """

    stream_id: str
    stream_version: int
    schema_version: int
    data: bytes


EventPayload = tuple[str, str, int, bytes]
"""An event as rebuilding an aggregate needs it: ``(event_id, event_type, schema_version,
data)``, the row as the driver returns it. A cold load reads up to a snapshot interval of
these, and building a ``RecordedEvent`` (its time, ids and position) for each cost more
than reading the rows (measured on SQLite: about 4 x the time of the 4-column rows)."""


def event_payload(record: RecordedEvent) -> EventPayload:
    """``record`` as the ``EventPayload`` of its event."""
    return record.event_id, record.event_type, record.schema_version, record.data


@runtime_checkable
class SnapshotStore(Protocol):
    """Where snapshots live: in the event store, beside the streams they summarise."""

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        """The latest snapshot of ``stream_id``, or None."""
        ...

    async def load_snapshot_and_events(
        self, stream_id: str
    ) -> tuple[Snapshot | None, list[EventPayload]]:
        """``load_snapshot``, and the stream's events after its version (all of them when
        there is none) in version order, read in one round trip: on a cold start each
        round trip more costs about as much as the rest of the command."""
        ...

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` unless one at a later stream version is already kept."""
        ...


class EventStore(Protocol):
    """Append-only event storage with optimistic concurrency and idempotency records.

    Every backend passes the same conformance suite (``tests/conformance``).
    """

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        """Append all of ``commit.events`` and record the command, atomically.

        Raises ``ConcurrencyConflictError`` if any stream's version differs from
        ``expected_versions`` or its last event from ``follows``, ``DuplicateCommandError``
        if the command_id is already recorded, ``StoreError`` for anything else. Returns the
        events with their positions, in the commit's order, only once they are durable.

        Appends are applied in the order they were started: a store takes the commit's
        place in its order before ``append`` first suspends. So a commit started after
        another, expecting the versions that one leaves, commits right behind it (in the
        same group commit or the next) whenever that one commits.
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


@record
class StreamLocked:
    """What ``SharedStreamLocks.lock_stream`` found."""

    waited: bool
    """Another process held the lock first."""
    events_after: list[RecordedEvent] | None = None
    """The stream's events after the version asked for (None if none was), read with the
    lock held."""


@runtime_checkable
class SharedStreamLocks(Protocol):
    """Per-stream locks that every process sharing a store sees (PostgreSQL's advisory
    locks), so that processes writing one stream at once can take turns at it instead of
    racing to concurrency conflicts. A store that only one process writes has none."""

    async def lock_stream(self, stream_id: str, after_version: int | None = None) -> StreamLocked:
        """Wait until this process holds ``stream_id``'s lock. Given ``after_version``, also
        read the stream's events after it once the lock is held, in the same round trip:
        whoever held the lock before may have written them."""
        ...

    async def unlock_stream(self, stream_id: str) -> None:
        """Release what ``lock_stream`` took."""
        ...

    async def announce_contention(self, stream_id: str) -> None:
        """Tell the other processes that this one takes turns at ``stream_id`` now."""
        ...

    def add_contention_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(stream_id)`` when another process announces contention."""
        ...
