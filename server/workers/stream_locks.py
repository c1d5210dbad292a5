"""The supervisor's stream locks: turns at contended streams for workers whose store has
no shared locks of its own (SQLite's; PostgreSQL's are advisory locks in the database).

A worker asks for a stream's lock when its turn at the stream begins and releases it when
the turn ends (``domain.locks.StreamTurns``). Requests are granted first come, first
served, so a busy worker cannot keep a stream from the others; a worker that goes away
(its connection to the hub closes) leaves whatever it held or waited for.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

H = TypeVar("H", bound=Hashable)
"""Who holds or waits for a lock (the supervisor's side of one worker's connection)."""


@dataclass(eq=False, slots=True)
class _Lock(Generic[H]):
    holder: H
    waiting: deque[tuple[H, int]] = field(default_factory=deque)
    """Who asked after the holder, in order, with the id of their request."""


class StreamLockTable(Generic[H]):
    """``grant(who, request_id, waited)`` answers each request, at once or on its turn
    (``waited``: someone else held the lock when it was asked for)."""

    def __init__(self, grant: Callable[[H, int, bool], None]) -> None:
        self._grant = grant
        self._locks: dict[str, _Lock[H]] = {}

    def lock(self, who: H, request_id: int, stream_id: str) -> None:
        held = self._locks.get(stream_id)
        if held is None:
            self._locks[stream_id] = _Lock(who)
            self._grant(who, request_id, False)
        else:
            held.waiting.append((who, request_id))

    def unlock(self, who: H, stream_id: str) -> None:
        """``who`` releases the lock, or gives up waiting for it (a request cancelled
        before its answer came; one granted meanwhile is released)."""
        held = self._locks.get(stream_id)
        if held is None:
            return
        if held.holder != who:
            for index, (waiter, _) in enumerate(held.waiting):
                if waiter == who:
                    del held.waiting[index]
                    return
            return
        self._pass_on(stream_id, held)

    def forget(self, who: H) -> None:
        """``who`` is gone: what it held passes on, and it waits for nothing."""
        for stream_id, held in list(self._locks.items()):
            held.waiting = deque(w for w in held.waiting if w[0] != who)
            if held.holder == who:
                self._pass_on(stream_id, held)

    def _pass_on(self, stream_id: str, held: _Lock[H]) -> None:
        if not held.waiting:
            del self._locks[stream_id]
            return
        held.holder, request_id = held.waiting.popleft()
        self._grant(held.holder, request_id, True)

    def __len__(self) -> int:
        """Streams locked now."""
        return len(self._locks)
