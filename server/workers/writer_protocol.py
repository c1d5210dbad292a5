"""The frames between SQLite workers and the process that owns the store's writer.

A frame is a 4-byte big-endian length and a pickle. Workers send ``(call_id, Commit)``;
the writer answers ``(call_id, outcome)`` and sends ``(WAKE, None)`` to every worker
after each group commit. Both ends are processes of one gateway on one host (a unix
socket in a folder only the gateway's user can enter), so pickle is safe here.

Outcomes travel as tagged tuples rather than pickled exceptions: an exception's pickle
is its ``args``, which for our errors is the formatted message, not the constructor's
arguments.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterator
from typing import Any, Final

from domain.errors import (
    ConcurrencyConflictError,
    DuplicateCommandError,
    StoreError,
    StoreUnavailableError,
)
from domain.ports import RecordedEvent

WAKE: Final = 0
"""The call id of a wake-up: new events may be readable."""
_LENGTH = struct.Struct("!I")

Outcome = tuple[str, Any]


def frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


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


def encode_outcome(result: list[RecordedEvent] | BaseException) -> Outcome:
    if isinstance(result, list):
        return ("ok", result)
    if isinstance(result, ConcurrencyConflictError):
        return ("conflict", str(result))
    if isinstance(result, DuplicateCommandError):
        return ("duplicate", result.command_id)
    if isinstance(result, StoreUnavailableError):
        return ("unavailable", str(result))
    # Anything else is the store's failure as far as the worker is concerned; the
    # writer's process logs the cause.
    return ("error", str(result) if isinstance(result, StoreError) else "the writer failed")


def decode_outcome(outcome: Outcome) -> list[RecordedEvent]:
    """The events of a committed append, or the append's error raised."""
    kind, value = outcome
    if kind == "ok":
        events: list[RecordedEvent] = value
        return events
    if kind == "conflict":
        raise ConcurrencyConflictError(value)
    if kind == "duplicate":
        raise DuplicateCommandError(value)
    if kind == "unavailable":
        raise StoreUnavailableError(value)
    raise StoreError(value)
