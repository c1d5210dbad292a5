"""The frames between workers and their supervisor's hub (``server.workers.hub``).

A frame is a 4-byte big-endian length and a pickle; either end writes the frames of one
turn of its event loop together (``FrameWriter``), so that a group commit's appends and
answers cross the socket in one write rather than one system call each. Workers send
``(call_id, commit)`` (an append, on SQLite: the supervisor owns the writer),
``(NOTICE, moved)`` (the worker committed itself, on PostgreSQL; ``moved``: each stream
the commit moved, with its new version) or ``(WANT, wanted)`` (whether it wants the
recorded events in its wake-ups: only while it has live subscriptions). The supervisor
answers an append with ``(call_id, outcome)`` and, after commits, sends every worker
``(WAKE, (moved, events))``: new events may be readable; ``moved`` lists the streams
*other* workers moved since the last wake-up, each with its latest version (a worker's
own commits leave its aggregate cache up to date, and with the versions at hand its
cache follower needs no read to find what moved); ``events`` are the events the
supervisor's writer recorded since the last wake-up, in position order, pickled once for
every worker that wants them (on SQLite, to workers that want them; empty otherwise), so
that a worker's subscriptions need not read them back from the file. On SQLite
workers also send ``(call_id, GroupCall)``: a consumer-group write or lease call, which
the supervisor answers with ``(call_id, outcome)``, and after a group is deleted it tells
every worker ``(GROUP_DELETED, (name, created_at))`` (``server.workers.groups``). Both ends are
processes of one gateway on one host (a unix socket in a folder only the gateway's user
can enter), so pickle is safe here.

A commit travels as plain tuples (``encode_commit``): pickling the frozen dataclasses
themselves looks up their fields on every event and cost more than the rest of the
handoff together (cProfile of appends through the hub). An append's outcome is a tagged
tuple rather than a pickled exception (an exception's
pickle is its ``args``: for our errors the formatted message, not the constructor's
arguments), and a success is only the first position: the worker knows the rest of the
recorded events from its commit.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import pickle
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from domain.errors import (
    ConcurrencyConflictError,
    DuplicateCommandError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)
from domain.ports import Commit, NewEvent, RecordedEvent, recorded_events
from server.consumer_groups.model import MemberIdTakenError

WAKE: Final = 0
"""Supervisor to worker: new events may be readable; the streams others moved."""
NOTICE: Final = -1
"""Worker to supervisor: this worker has just committed (by itself), these streams."""
GROUP_DELETED: Final = -2
"""Supervisor to worker: ``(name, created_at)``, a consumer group deleted (on SQLite)."""
WANT: Final = -3
"""Worker to supervisor: whether to send it the recorded events."""
_LENGTH = struct.Struct("!I")

Outcome = tuple[str, Any]
Moved = list[tuple[str, int]]
"""Streams, each with the version a commit (or several) moved it to."""


def frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


def moved_by(events: Sequence[NewEvent]) -> Moved:
    """The streams a commit's ``events`` move, each with its last version."""
    return list({event.stream_id: event.stream_version for event in events}.items())


class FrameWriter:
    """Frames sent in one turn of the event loop, written to ``transport`` together at
    its end: one system call (and one wake-up of the reader) instead of one per frame."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._frames: list[bytes] = []

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, data: bytes) -> None:
        if not self._frames:
            asyncio.get_running_loop().call_soon(self._flush)
        self._frames.append(data)

    def _flush(self) -> None:
        frames, self._frames = self._frames, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(frames))


class FrameBuffer:
    """Bytes received so far, handed out as whole messages."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, data: bytes) -> Iterator[Any]:
        self._data += data
        start = 0
        size = len(self._data)
        while size - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._data, start)
            end = start + _LENGTH.size + length
            if end > size:
                break
            yield pickle.loads(self._data[start + _LENGTH.size : end])
            start = end
        del self._data[:start]


EncodedCommit = tuple[
    str,
    str,
    str,
    str,
    dt.datetime,
    dict[str, int],
    list[tuple[str, str, int, str, bytes, int]],
    dict[str, str],
]


def encode_commit(commit: Commit) -> EncodedCommit:
    return (
        commit.command_id,
        commit.fingerprint,
        commit.correlation_id,
        commit.user_id,
        commit.occurred_at,
        dict(commit.expected_versions),
        [
            (e.event_id, e.stream_id, e.stream_version, e.event_type, e.data, e.schema_version)
            for e in commit.events
        ],
        dict(commit.follows),
    )


def decode_commit(encoded: EncodedCommit) -> Commit:
    command_id, fingerprint, correlation_id, user_id, occurred_at, expected, events, follows = (
        encoded
    )
    return Commit(
        command_id,
        fingerprint,
        correlation_id,
        user_id,
        occurred_at,
        expected,
        [NewEvent(*event) for event in events],
        follows,
    )


def encode_outcome(result: list[RecordedEvent] | BaseException) -> Outcome:
    if isinstance(result, list):
        return ("ok", result[0].position if result else 0)
    if isinstance(result, ConcurrencyConflictError):
        return ("conflict", str(result))
    if isinstance(result, DuplicateCommandError):
        return ("duplicate", result.command_id)
    if isinstance(result, StoreUnavailableError):
        return ("unavailable", str(result))
    if isinstance(result, StoreFullError):
        return ("full", str(result))
    # Anything else is the store's failure as far as the worker is concerned; the
    # supervisor logs the cause.
    return ("error", str(result) if isinstance(result, StoreError) else "the writer failed")


EncodedEvent = tuple[str, str, int, int, dt.datetime, str, str, str, str, bytes, int]


def encode_events(events: list[RecordedEvent]) -> bytes:
    """Pickled once, however many workers it goes to."""
    encoded: list[EncodedEvent] = [
        (
            e.event_id,
            e.stream_id,
            e.stream_version,
            e.position,
            e.occurred_at,
            e.command_id,
            e.correlation_id,
            e.user_id,
            e.event_type,
            e.data,
            e.schema_version,
        )
        for e in events
    ]
    return pickle.dumps(encoded, protocol=pickle.HIGHEST_PROTOCOL)


def decode_events(encoded: bytes) -> list[RecordedEvent]:
    return [RecordedEvent(*event) for event in pickle.loads(encoded)]


def decode_outcome(commit: Commit, outcome: Outcome) -> list[RecordedEvent]:
    """The events ``commit`` recorded, or the append's error raised."""
    kind, value = outcome
    if kind == "ok":
        # A commit's events take consecutive positions, in the commit's order.
        return recorded_events(commit, value)
    if kind == "conflict":
        raise ConcurrencyConflictError(value)
    if kind == "duplicate":
        raise DuplicateCommandError(value)
    if kind == "unavailable":
        raise StoreUnavailableError(value)
    if kind == "full":
        raise StoreFullError(value)
    raise StoreError(value)


@dataclass(frozen=True, slots=True)
class GroupCall:
    """A worker's call of the supervisor's consumer-group records or partition leases:
    ``method`` of ``server.workers.groups.GroupsHost`` with ``args``."""

    method: str
    args: tuple[Any, ...]


def encode_call_outcome(result: object) -> Outcome:
    """A group call's result, or its error (``result`` is the exception)."""
    if isinstance(result, MemberIdTakenError):
        return ("taken", (result.group, result.member_id))
    if isinstance(result, BaseException):
        return encode_outcome(result)
    return ("ok", result)


def decode_call_outcome(outcome: Outcome) -> Any:
    """A group call's result, or its error raised."""
    kind, value = outcome
    if kind == "ok":
        return value
    if kind == "taken":
        raise MemberIdTakenError(*value)
    if kind == "unavailable":
        raise StoreUnavailableError(value)
    if kind == "full":
        raise StoreFullError(value)
    raise StoreError(value)
