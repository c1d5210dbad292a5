"""Keeps a worker's aggregate cache up to date with the other workers' commits.

Each worker keeps recently used orders and products in memory and trusts them until an
append says otherwise (``domain.unit_of_work``). Once another worker has changed one, the
next command here would fail its append, drop the cached copy, read the whole stream
back and run again after a backoff sleep. The follower prevents that: woken when
another worker has committed (``wake``, by the supervisor's hub), it reads the new
events in one ``read_all`` page after another, as a subscription does, and marks the
cached streams they moved on as stale, so that the next command on one reads only what
is new (``AggregateCache.mark_stale``) instead of failing its append first.

Forgetting the changed streams instead was measured first: every such command then read
its product's whole stream back, and ``--workers 2`` spent 1.5 to 1.9 x the server CPU
per call of one worker (interleaved runs, SQLite, 32 concurrent).

A refresh is an optimisation only: the append's expected-version check still decides.

Stopping does not rest on cancellation alone: a read in flight while the store closes
under it can end in the store's error rather than the cancellation (the driver's and its
pool's clean-up of a cancelled wait may raise their own), which the loop survives by
design. A worker whose supervisor was killed was seen waiting for ever on a follower
cancelled yet back at its next wake-up; the loop now also ends on ``stop``'s flag, and
``stop`` waits a bounded time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from domain.ports import EventStore, RecordedEvent
from domain.unit_of_work import AggregateCache

log = logging.getLogger("order_gateway.workers")

PAGE: Final = 1000
INTERVAL_SECONDS: Final = 0.002
"""Least time between two reads: under load one read then covers many commits. Each
read costs about as much as a command's own reads, and with N workers every worker
would otherwise read once per commit of any other (measured with one read per wake-up:
on PostgreSQL at 32 concurrent the workers spent 1.6 x the CPU per call of one process);
a cached aggregate may stay behind that long, which an append's check still catches."""
STOP_SECONDS: Final = 1.0
"""Longest ``stop`` waits for a read in flight."""


class CacheFollower:
    def __init__(self, store: EventStore, cache: AggregateCache) -> None:
        self._store = store
        self._cache = cache
        self._position = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Follow from the current head (the cache is empty at start)."""
        self._position = await self._store.head_position()
        self._task = asyncio.create_task(self._follow(), name="cache-follower")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=STOP_SECONDS)

    async def _follow(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            try:
                while page := await self._store.read_all(self._position, PAGE):
                    self._position = page[-1].position
                    self._apply(page)
                    if len(page) < PAGE:
                        break
            except Exception:  # the store's trouble shows on the command path too
                log.exception("following commits for the aggregate cache failed")
            await asyncio.sleep(INTERVAL_SECONDS)

    def _apply(self, page: list[RecordedEvent]) -> None:
        for record in page:
            entry = self._cache.get(record.stream_id)
            if entry is not None and entry.head.version < record.stream_version:
                # Another worker's commit: the next command on it reads what is new.
                self._cache.mark_stale(record.stream_id)
