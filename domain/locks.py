"""Per-stream locks, so commands in one process that touch the same stream queue up
instead of racing to a concurrency conflict.

They are an optimisation only: correctness across processes comes from the store's
expected-version check. Locks are always taken in sorted stream order, which rules out
deadlock between commands that touch overlapping sets of streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager


class StreamLocks:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiters: dict[str, int] = {}

    @asynccontextmanager
    async def hold(self, stream_ids: Iterable[str]) -> AsyncIterator[None]:
        ordered = sorted(set(stream_ids))
        registered: list[str] = []
        held: set[str] = set()
        try:
            for stream_id in ordered:
                lock = self._locks.setdefault(stream_id, asyncio.Lock())
                self._waiters[stream_id] = self._waiters.get(stream_id, 0) + 1
                registered.append(stream_id)
                await lock.acquire()
                held.add(stream_id)
            yield
        finally:
            for stream_id in reversed(registered):
                if stream_id in held:
                    self._locks[stream_id].release()
                self._waiters[stream_id] -= 1
                if not self._waiters[stream_id]:
                    # Nobody holds or waits for it: forget it so the table stays small.
                    del self._waiters[stream_id]
                    del self._locks[stream_id]
