"""Stored events as plain rows: what a subscription catching up reads, when the store can.

A subscription catching up on a large store maps every event it reads to proto once and
then drops it. Building a ``RecordedEvent`` (a frozen dataclass) and a ``datetime`` for
each cost about as much as the mapping to proto itself, so a store whose reads produce
rows anyway (SQLite) hands them over as they are: the same events as ``read_all``, in the
same order, each a tuple of ``RecordedEvent``'s fields in field order, with the time as
microseconds since the Unix epoch instead of a ``datetime``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol, runtime_checkable

from domain.errors import StoreError

EventRow = tuple[str, str, int, int, int, str, str, str, str, bytes, int]
"""event_id, stream_id, stream_version, position, occurred_at (µs since the epoch, UTC),
command_id, correlation_id, user_id, event_type, data, schema_version."""

STREAM_ID: Final = 1
POSITION: Final = 3
COMMAND_ID: Final = 5
EVENT_TYPE: Final = 8
DATA: Final = 9


class UndecodableRowError(StoreError):
    """A stored event cannot be read: a text column of its row is not valid UTF-8 (the
    file was damaged). ``row`` is that row with the bad bytes replaced (U+FFFD), for a
    check of what is left of it; ``before`` holds the rows of the same read that came
    before it."""

    def __init__(self, row: EventRow, reason: str, before: Sequence[EventRow]) -> None:
        super().__init__(
            f"the stored event at position {row[POSITION]} cannot be read ({reason}): the"
            " store is damaged there; order-gateway verify reports what else is"
        )
        self.row = row
        self.position = row[POSITION]
        self.reason = reason
        self.before = list(before)


@runtime_checkable
class EventRowReader(Protocol):
    async def read_all_rows(self, after_position: int, limit: int) -> list[EventRow]:
        """``read_all(after_position, limit)``, as rows."""
        ...


@runtime_checkable
class StreamRowReader(Protocol):
    async def read_stream_rows_after(
        self, stream_id: str, after_position: int, limit: int
    ) -> tuple[list[EventRow], int]:
        """The events of ``stream_id`` at positions after ``after_position``, in position
        order, at most ``limit``, as rows; and the head position of the snapshot they were
        read from. Fewer than ``limit`` rows means every event up to that head was
        examined: a reader following one stream skips the rest of the log by index."""
        ...


GATEWAY_COLUMNS: Final = (
    "position",
    "event_id",
    "stream_id",
    "stream_version",
    "command_id",
    "event_type",
    "data",
)
"""Columns of the ``events`` table in every version of either store's schema: how a
database is told to hold the gateway's, not another program's table of that name."""
