"""Store faults as an operator sees them: a line when they start, a line when they end.

A full disk or a database that went away fails every call until someone acts, and a
traceback per call would bury the one thing to act on. So the store is watched as a
whole (``watched``): the first call that fails with a fault (``StoreFullError``,
``StoreUnavailableError``) logs one ERROR line with the cause; the calls that fail after
it are only counted; the first call that works again logs one WARNING line with how long
the fault lasted and how many store calls failed meanwhile, once no call has failed
for ``RECOVERY_QUIET`` seconds since (then, if no call comes: the fault must not outlive
the store's recovery on an idle gateway, where alerts would read it): a store that fails
some calls and not others (a disk with
room left for small commits only) is in one fault, not in a pair of lines per call (a
load test counted 3,200 pairs in 35 s on a nearly full PostgreSQL). Every failed store call is
also counted by kind in ``order_gateway_store_errors_total``, and
``order_gateway_store_fault`` is 1 for the kind of fault in progress.

Only a write ends a fault that a write ran into: with a full disk, reads keep working
while every append fails, and treating each successful read as a recovery would log a
pair of lines per command.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from prometheus_client import Counter, Gauge

from domain.errors import DomainError, StoreError, StoreFullError, StoreUnavailableError
from domain.ports import (
    CommandRecord,
    Commit,
    EventStore,
    RecordedEvent,
    SharedStreamLocks,
    StreamLocked,
)
from server.stores.decorator import EventStoreDecorator
from server.stores.event_rows import EventRow, EventRowReader, StreamRowReader

log = logging.getLogger("order_gateway.store")

T = TypeVar("T")

FULL: Final = "full"
UNAVAILABLE: Final = "unavailable"
OTHER: Final = "other"
KINDS: Final = (FULL, UNAVAILABLE, OTHER)
"""The ``kind`` label of the store-error metrics."""

RECOVERY_QUIET: Final = 1.0
"""Seconds without a fault's failures before a call that works ends it."""

_REASONS: Final = {FULL: StoreFullError.reason, UNAVAILABLE: StoreUnavailableError.reason}
_ANSWERS: Final = {
    FULL: "commands are answered RESOURCE_EXHAUSTED (STORE_FULL) until space is freed",
    UNAVAILABLE: "calls are answered UNAVAILABLE (STORE_UNAVAILABLE) until it is reachable",
}


def error_kind(error: StoreError) -> str:
    if isinstance(error, StoreFullError):
        return FULL
    if isinstance(error, StoreUnavailableError):
        return UNAVAILABLE
    return OTHER


def describe(error: BaseException) -> str:
    """The store error's message and, when it adds something, the driver's.

    A PostgreSQL error's text is its message followed by lines of its own (HINT, and
    CONTEXT: the statement and function it failed in), while the store error quotes only
    the message: the driver's text adds nothing when its first line is already there.
    """
    message = str(error)
    cause = error.__cause__
    if cause is None:
        return message
    detail = str(cause).strip()
    if detail and detail.partition("\n")[0] not in message:
        message = f"{message}: {detail}"
    return message


class StoreFaults:
    """Whether the store is in a fault condition; logs and counts entering and leaving it."""

    def __init__(
        self,
        errors: Counter,
        fault: Gauge,
        clock: Callable[[], float] = time.monotonic,
        recovery_quiet: float = RECOVERY_QUIET,
    ) -> None:
        self._errors = {kind: errors.labels(kind) for kind in KINDS}
        self._fault = {kind: fault.labels(kind) for kind in (FULL, UNAVAILABLE)}
        self._clock = clock
        self._kind: str | None = None
        self._reason = ""
        self._cause = ""
        self._since = 0.0
        self._failed = 0
        self._write_failed = False
        self._recovery_quiet = recovery_quiet
        self._last_failure = 0.0
        self._worked_at: float | None = None
        """When a call that can end the fault first worked after its last failure."""
        self._recheck: asyncio.TimerHandle | None = None

    @property
    def kind(self) -> str | None:
        """The fault in progress (``"full"`` or ``"unavailable"``), or None."""
        return self._kind

    def failed(self, error: StoreError, *, write: bool) -> None:
        kind = error_kind(error)
        self._errors[kind].inc()
        if self._kind is not None:
            self._failed += 1
            self._write_failed |= write
        if kind == OTHER:
            return
        self._last_failure = self._clock()
        self._worked_at = None
        if kind == self._kind:
            return
        # A new fault, or another kind of one (a database that came back full).
        reason = _REASONS[kind]
        if self._kind is None:
            self._since = self._clock()
            self._failed = 1
            self._write_failed = write
        else:
            self._fault[self._kind].set(0)
        self._kind, self._reason, self._cause = kind, reason, describe(error)
        self._fault[kind].set(1)
        log.error(
            "event store fault %s: %s; %s",
            reason,
            self._cause,
            _ANSWERS[kind],
            extra={"fields": {"store_fault": reason, "cause": self._cause}},
        )

    def succeeded(self, *, write: bool) -> None:
        if self._kind is None or (self._write_failed and not write):
            return
        now = self._clock()
        if self._worked_at is None:
            self._worked_at = now
        quiet_for = now - self._last_failure
        if quiet_for < self._recovery_quiet:
            self._recheck_in(self._recovery_quiet - quiet_for)
            return
        self._recovered(now)

    def _recheck_in(self, delay: float) -> None:
        """End the fault once the quiet period is over, if no call failed meanwhile, even
        if no call comes then (outside an event loop, only a later call can end it)."""
        if self._recheck is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._recheck = loop.call_later(delay, self._rechecked)

    def _rechecked(self) -> None:
        self._recheck = None
        if self._kind is None or self._worked_at is None:
            return  # Ended meanwhile, or a call failed after the one that worked.
        quiet_for = self._clock() - self._last_failure
        if quiet_for < self._recovery_quiet:
            self._recheck_in(self._recovery_quiet - quiet_for)
            return
        self._recovered(self._worked_at)

    def _recovered(self, worked_at: float) -> None:
        """The fault is over: the store worked at ``worked_at`` and no call failed since."""
        assert self._kind is not None
        seconds = worked_at - self._since
        log.warning(
            "event store works again after %.1f s of %s (%s); %d store %s failed meanwhile",
            seconds,
            self._reason,
            self._cause,
            self._failed,
            "call" if self._failed == 1 else "calls",
            extra={
                "fields": {
                    "store_fault": self._reason,
                    "cause": self._cause,
                    "fault_seconds": round(seconds, 3),
                    "failed_calls": self._failed,
                }
            },
        )
        self._fault[self._kind].set(0)
        self._kind = None
        self._worked_at = None
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None


async def _watched(faults: StoreFaults, call: Awaitable[T], *, write: bool = False) -> T:
    """``call``'s outcome, reported to ``faults``. An error a command caused (a lost race,
    a repeated command id) is the store answering, so it counts as a call that worked."""
    try:
        result = await call
    except StoreError as error:
        faults.failed(error, write=write)
        raise
    except DomainError:
        faults.succeeded(write=write)
        raise
    faults.succeeded(write=write)
    return result


class FaultWatchingEventStore(EventStoreDecorator):
    """Reports the outcome of every store call to ``StoreFaults``."""

    def __init__(self, inner: EventStore, faults: StoreFaults) -> None:
        super().__init__(inner)
        self._faults = faults

    async def _watch(self, call: Awaitable[T], *, write: bool = False) -> T:
        return await _watched(self._faults, call, write=write)

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        return await self._watch(self._inner.append(commit), write=True)

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        return await self._watch(self._inner.read_stream(stream_id, after_version))

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        return await self._watch(self._inner.read_all(after_position, limit))

    async def head_position(self) -> int:
        return await self._watch(self._inner.head_position())

    async def find_command(self, command_id: str) -> CommandRecord | None:
        return await self._watch(self._inner.find_command(command_id))


class _FaultWatchingRowStore(FaultWatchingEventStore):
    """The same, for a store that also reads plain rows (``server.stores.event_rows``), so that
    subscriptions keep that faster path."""

    def __init__(self, inner: EventStore, faults: StoreFaults) -> None:
        super().__init__(inner, faults)
        assert isinstance(inner, EventRowReader) and isinstance(inner, StreamRowReader)
        self._rows: EventRowReader = inner
        self._stream_rows: StreamRowReader = inner

    async def read_all_rows(self, after_position: int = 0, limit: int = 1000) -> list[EventRow]:
        return await self._watch(self._rows.read_all_rows(after_position, limit))

    async def read_stream_rows_after(
        self, stream_id: str, after_position: int, limit: int
    ) -> tuple[list[EventRow], int]:
        return await self._watch(
            self._stream_rows.read_stream_rows_after(stream_id, after_position, limit)
        )


class FaultWatchingStreamLocks:
    """A store's ``SharedStreamLocks``, reporting the outcome of each call to the database
    to ``StoreFaults``: a command on a contended stream meets a fault first when it takes
    its turn, and its refusal is a failed store call like any other."""

    def __init__(self, inner: SharedStreamLocks, faults: StoreFaults) -> None:
        self._inner = inner
        self._faults = faults

    async def lock_stream(self, stream_id: str, after_version: int | None = None) -> StreamLocked:
        return await _watched(self._faults, self._inner.lock_stream(stream_id, after_version))

    async def unlock_stream(self, stream_id: str) -> None:
        await _watched(self._faults, self._inner.unlock_stream(stream_id))

    async def announce_contention(self, stream_id: str) -> None:
        await _watched(self._faults, self._inner.announce_contention(stream_id))

    def add_contention_listener(self, listener: Callable[[str], None]) -> None:
        self._inner.add_contention_listener(listener)


def watched(store: EventStore, faults: StoreFaults) -> EventStore:
    """``store``, reporting every call's outcome to ``faults``."""
    if isinstance(store, EventRowReader) and isinstance(store, StreamRowReader):
        return _FaultWatchingRowStore(store, faults)
    return FaultWatchingEventStore(store, faults)
