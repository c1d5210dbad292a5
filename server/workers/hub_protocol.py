"""The frames between workers and their supervisor's hub (``server.workers.hub``).

A frame is a 4-byte big-endian length and a pickle; either end writes the frames of one
turn of its event loop together (``FrameWriter``): one system call rather than one each.
A worker sends ``(NOTICE, events)`` after each of its commits (``events``: the commit's
events, pickled once by ``encode_events``), and the supervisor sends every *other* worker
``(WAKE, notices)``: new events are readable, and these are the other workers' commits
since its last wake-up, as they came (with the events at hand, the worker's cache
follower brings the cached streams they moved up to date without reading them back).
The first ``(WAKE, [])`` tells a worker that
the hub has taken its connection. On SQLite workers also send ``(call_id, GroupCall)``:
a consumer-group write or lease call, which the supervisor answers with
``(call_id, outcome)``, and after a group is deleted it tells every worker
``(GROUP_DELETED, (name, created_at))`` (``server.workers.groups``). A worker whose
subscriptions (``Subscribe`` streams, consumer-group members) go from none to some, or
back, sends ``(LISTENING, bool)``, and the supervisor tells each worker
``(OTHERS_LISTENING, bool)`` whenever whether some *other* worker listens changes: a
worker's notices hurry only for a listener or a worker that commits too
(``server.workers.hub_client``). Where the store has no shared stream locks of its own
(SQLite), workers take turns at contended streams through the hub
(``server.workers.stream_locks``): ``(LOCK_STREAM, (request_id, stream_id))``, answered
``(request_id, ("ok", waited))`` when the lock is the worker's, ``(UNLOCK_STREAM,
stream_id)`` (also a request given up), and ``(CONTENTION, stream_id)``, which the
supervisor passes on to every other worker: take turns at that stream from now on. Both
ends are
processes of one gateway on one host (a unix socket in a folder only the gateway's user
can enter), so pickle is safe here.

An outcome is a tagged tuple rather than a pickled exception (an exception's pickle is
its ``args``: for our errors the formatted message, not the constructor's arguments).
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from domain.errors import StoreError, StoreFullError, StoreUnavailableError
from domain.ports import NewEvent
from server.consumer_groups.model import MemberIdTakenError

WAKE: Final = 0
"""Supervisor to worker: new events may be readable; the other workers' commits."""
NOTICE: Final = -1
"""Worker to supervisor: this worker has just committed these events."""
GROUP_DELETED: Final = -2
"""Supervisor to worker: ``(name, created_at)``, a consumer group deleted (on SQLite)."""
LISTENING: Final = -3
"""Worker to supervisor: whether this worker has subscriptions now (a bool)."""
OTHERS_LISTENING: Final = -4
"""Supervisor to worker: whether any other worker has subscriptions now (a bool)."""
LOCK_STREAM: Final = -5
"""Worker to supervisor: ``(request_id, stream_id)``, wait for the stream's lock."""
UNLOCK_STREAM: Final = -6
"""Worker to supervisor: ``stream_id``, release its lock (or stop waiting for it)."""
CONTENTION: Final = -7
"""Both ways: ``stream_id``, a stream the workers take turns at from now on."""
_LENGTH = struct.Struct("!I")

Outcome = tuple[str, Any]
EncodedEvent = tuple[str, str, int, str, bytes, int]
"""A committed event as a notice carries it: ``NewEvent``'s fields, in order."""


def frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


def encode_events(events: Sequence[NewEvent]) -> bytes:
    """A commit's events for a notice: pickled once, however many workers it goes to."""
    encoded: list[EncodedEvent] = [
        (e.event_id, e.stream_id, e.stream_version, e.event_type, e.data, e.schema_version)
        for e in events
    ]
    return pickle.dumps(encoded, protocol=pickle.HIGHEST_PROTOCOL)


def decode_events(notice: bytes) -> list[EncodedEvent]:
    events: list[EncodedEvent] = pickle.loads(notice)
    return events


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


def encode_error(result: BaseException) -> Outcome:
    if isinstance(result, StoreUnavailableError):
        return ("unavailable", str(result))
    if isinstance(result, StoreFullError):
        return ("full", str(result))
    # Anything else is the store's failure as far as the worker is concerned; the
    # supervisor logs the cause.
    return ("error", str(result) if isinstance(result, StoreError) else "the supervisor failed")


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
        return encode_error(result)
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
