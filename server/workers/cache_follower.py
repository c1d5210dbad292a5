"""Keeps a worker's aggregate cache up to date with the other workers' commits.

Each worker keeps recently used orders and products in memory and trusts them until an
append says otherwise (``domain.unit_of_work``). Once another worker has changed one, the
next command here would fail its append, drop the cached copy, read the whole stream
back and run again after a backoff sleep. The follower prevents that: the hub's wake-up
names the streams other workers moved, each with its new version (``server.workers.hub``),
and the follower marks those this worker holds at an older version as stale, so that the
next command on one reads only what is new (``AggregateCache.mark_stale``) instead of
failing its append first.

Forgetting the changed streams instead was measured first: every such command then read
its product's whole stream back, and ``--workers 2`` spent 1.5 to 1.9 x the server CPU
per call of one worker (interleaved runs, SQLite, 32 concurrent). Before the wake-ups
named the streams, the follower read the new events (``read_all`` pages, at most every
2 ms) only to learn which streams they moved: in every worker, a query and a record per
event of every other worker.

A refresh is an optimisation only: the append's expected-version check still decides.
"""

from __future__ import annotations

from domain.unit_of_work import AggregateCache
from server.workers.hub_protocol import Moved


class CacheFollower:
    def __init__(self, cache: AggregateCache) -> None:
        self._cache = cache

    def moved(self, streams: Moved) -> None:
        """Other workers committed: ``streams`` with the versions they reached."""
        for stream_id, version in streams:
            entry = self._cache.get(stream_id)
            if entry is not None and entry.head.version < version:
                # The next command on it here reads what is new.
                self._cache.mark_stale(stream_id)
