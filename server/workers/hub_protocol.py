"""The frames between workers and their supervisor's hub (``server.workers.hub``).

A frame is a 4-byte big-endian length and a pickle; either end writes the frames of one
turn of its event loop together (``FrameWriter``): one system call rather than one each.
A worker sends ``(NOTICE, moved)`` after each of its commits (``moved``: each stream the
commit moved, with its new version), and the supervisor sends every *other* worker
``(WAKE, moved)``: new events are readable, and these streams moved since its last
wake-up, each at its latest version (with the versions at hand, the worker's cache
follower needs no read to find what moved). The first ``(WAKE, [])`` tells a worker that
the hub has taken its connection. On SQLite workers also send ``(call_id, GroupCall)``:
a consumer-group write or lease call, which the supervisor answers with
``(call_id, outcome)``, and after a group is deleted it tells every worker
``(GROUP_DELETED, (name, created_at))`` (``server.workers.groups``). Both ends are
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
"""Supervisor to worker: new events may be readable; the streams others moved."""
NOTICE: Final = -1
"""Worker to supervisor: this worker has just committed (by itself), these streams."""
GROUP_DELETED: Final = -2
"""Supervisor to worker: ``(name, created_at)``, a consumer group deleted (on SQLite)."""
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
