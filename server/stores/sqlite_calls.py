"""Handing work from event loops to the SQLite store's threads, and the answers back.

Coroutines queue a ``Call`` and await its future; a store thread takes queued calls in
batches and answers each batch with ONE ``call_soon_threadsafe`` per event loop, not
one per call. Every handoff between threads costs a wake-up and a fight for the GIL,
so answering in batches is what keeps the event loop's cost per command low when
hundreds of commands are in flight.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Generic, TypeVar

from domain.errors import StoreError

log = logging.getLogger("order_gateway.store.sqlite")

W = TypeVar("W")
R = TypeVar("R")

Listeners = Mapping[asyncio.AbstractEventLoop, Sequence[Callable[[], None]]]
"""Commit listeners, by the loop each runs on."""
NO_LISTENERS: Final[Listeners] = MappingProxyType({})


class NotDone:
    """The outcome of a call until a store thread gives it one."""


NOT_DONE: Final = NotDone()


@dataclass(slots=True, eq=False)
class Call(Generic[W, R]):
    """One piece of work for a store thread, answered on the loop it came from."""

    work: W
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[R]
    outcome: R | BaseException | NotDone = NOT_DONE
    """A shared marker, not an error made in advance: making one for every call cost
    1,300 instructions on the event loop."""


class _Stop:
    """Queued by ``close()``, once per consumer thread, behind every call already queued."""


_STOP: Final = _Stop()


class CallQueue(Generic[W, R]):
    """Calls waiting for the threads that consume them; refuses new ones once closed."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Call[W, R] | _Stop] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closing = False

    @property
    def closing(self) -> bool:
        return self._closing

    def empty(self) -> bool:
        """Whether no call is queued (any may be being handled)."""
        return self._queue.empty()

    def submit(self, work: W) -> asyncio.Future[R]:
        """Queue ``work`` now; the future is settled on the running loop.

        Not a coroutine of its own: the caller's coroutine awaits the future, one frame
        fewer to create, suspend and resume through (1,400 instructions a call).
        """
        loop = asyncio.get_running_loop()
        call: Call[W, R] = Call(work, loop, loop.create_future())
        with self._lock:
            # Under the lock, so that no call can be queued behind the stop markers.
            if self._closing:
                raise StoreError("the SQLite store is closed")
            self._queue.put(call)
        return call.future

    def take(self, limit: int) -> tuple[list[Call[W, R]], bool]:
        """Block for one call, then take up to ``limit`` without waiting.

        Returns the calls and whether this consumer must stop after handling them.

        Never ``get(timeout=…)`` here: with more than one consumer thread on the queue
        (the readers), CPython 3.11's ``SimpleQueue`` lets a timed ``get`` whose item was
        taken by the other consumer wait again past its deadline, until the next ``put``.
        Measured while trying a commit delay (a timed wait for more calls): a 0.2 ms
        ``get`` waited up to 0.35 s under load, and once the load stopped, reads queued
        behind it stalled until the store closed.
        """
        first = self._queue.get()
        if isinstance(first, _Stop):
            return [], True
        return self.take_more([first], limit)

    def take_more(self, batch: list[Call[W, R]], limit: int) -> tuple[list[Call[W, R]], bool]:
        """``batch`` and what else is queued, up to ``limit`` calls, without waiting;
        and whether this consumer must stop after handling them."""
        # ``empty()`` first: the ``Empty`` that ``get_nowait`` raises on an empty queue
        # costs 1,900 instructions, and the writer finds its queue empty after nearly
        # every batch. Another consumer may still take the item first.
        while len(batch) < limit and not self._queue.empty():
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Stop):
                return batch, True
            batch.append(item)
        return batch, False

    def close(self, consumers: int) -> None:
        """Let each of ``consumers`` threads finish what is queued, then stop."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            for _ in range(consumers):
                self._queue.put(_STOP)


def answer(
    batch: Sequence[Call[W, R]],
    listeners: Listeners = NO_LISTENERS,
    here: asyncio.AbstractEventLoop | None = None,
) -> None:
    """From a store thread: settle every call on its loop, then wake ``listeners``.
    ``here``: the loop this runs on, if any, whose calls and listeners are handled at once.

    At once rather than by ``call_soon``: a commit on the event loop answers its caller by
    returning, and only wakes its loop's listeners here, which scheduling as a callback
    cost 13,800 instructions per commit (callgrind, one listener, as the gateway has: the
    subscription hub's). A listener only records that there is something new to read.
    """
    calls: dict[asyncio.AbstractEventLoop, list[Call[W, R]]] = {}
    for call in batch:
        calls.setdefault(call.loop, []).append(call)
    for loop in calls.keys() | listeners.keys():
        if loop is here:
            _settle(calls.get(loop, ()), listeners.get(loop, ()))
            continue
        try:
            loop.call_soon_threadsafe(_settle, calls.get(loop, ()), listeners.get(loop, ()))
        except RuntimeError:
            log.warning("an event loop closed before the SQLite store could answer it")


def _settle(calls: Sequence[Call[W, R]], listeners: Sequence[Callable[[], None]]) -> None:
    """On the caller's loop: hand each call its outcome, then run the listeners."""
    for call in calls:
        if call.future.done():  # the caller was cancelled; a commit stands anyway
            continue
        if isinstance(call.outcome, BaseException):
            call.future.set_exception(call.outcome)
        elif isinstance(call.outcome, NotDone):
            call.future.set_exception(StoreError("the SQLite store did not handle this call"))
        else:
            call.future.set_result(call.outcome)
    for listener in listeners:
        try:
            listener()
        except Exception:
            log.exception("a commit listener failed")
