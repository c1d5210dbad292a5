"""Per-stream locks, so commands in one process that touch the same stream queue up
instead of racing to a concurrency conflict.

They are an optimisation only: correctness across processes comes from the store's
expected-version check. Locks are always taken in sorted stream order, which rules out
deadlock between commands that touch overlapping sets of streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


class StreamLocks:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiters: dict[str, int] = {}

    async def acquire(self, stream_ids: Iterable[str]) -> tuple[str, ...]:
        """Wait for every stream's lock, taken in sorted order; returns what to ``release``.

        If the wait is cancelled, the locks already taken are released again.
        """
        ordered = tuple(sorted(set(stream_ids)))
        for stream_id in ordered:
            # Registered before waiting, so that no holder's release forgets the lock.
            if stream_id not in self._locks:
                self._locks[stream_id] = asyncio.Lock()
            self._waiters[stream_id] = self._waiters.get(stream_id, 0) + 1
        held = 0
        try:
            for stream_id in ordered:
                await self._locks[stream_id].acquire()
                held += 1
        except BaseException:
            self._unregister(ordered, held)
            raise
        return ordered

    def release(self, held: tuple[str, ...]) -> None:
        """Release what ``acquire`` returned."""
        self._unregister(held, len(held))

    def _unregister(self, ordered: tuple[str, ...], held: int) -> None:
        for index in reversed(range(len(ordered))):
            stream_id = ordered[index]
            if index < held:
                self._locks[stream_id].release()
            self._waiters[stream_id] -= 1
            if not self._waiters[stream_id]:
                # Nobody holds or waits for it: forget it so the table stays small.
                del self._waiters[stream_id]
                del self._locks[stream_id]
