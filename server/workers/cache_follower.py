"""Keeps a worker's aggregate cache up to date with the other workers' commits.

Each worker keeps recently used orders and products in memory and trusts them until an
append says otherwise (``domain.unit_of_work``). Once another worker has changed one, the
next command here would fail its append, drop the cached copy, read the whole stream
back and run again after a backoff sleep. The follower prevents that: the hub's wake-up
carries the other workers' commits, events and all (``server.workers.hub``), and the
follower applies them to the streams this worker holds, as a read of the stream would
(``AggregateCache.refresh``), so that the next command on one decides on the current
state at once. Where it cannot (a commit of this worker's own is queued on the stream,
the events do not follow on from the cached state, or one does not decode), it marks the
stream stale, and the next command on it reads what is new (``AggregateCache.mark_stale``)
instead of failing its append first.

Forgetting the changed streams instead was measured first: every such command then read
its product's whole stream back, and ``--workers 2`` spent 1.5 to 1.9 x the server CPU
per call of one worker (interleaved runs, SQLite, 32 concurrent). Before the wake-ups
carried the commits, the follower read the new events (``read_all`` pages, at most every
2 ms) only to learn which streams they moved, and each command on such a stream then
read it again.

A refresh is an optimisation only: the append's expected-version check still decides.
"""

from __future__ import annotations

from operator import itemgetter

from domain.mapper import decode
from domain.unit_of_work import AggregateCache, CachedStream
from server.workers.hub_protocol import EncodedEvent, decode_events

_VERSION = itemgetter(2)


class CacheFollower:
    def __init__(self, cache: AggregateCache) -> None:
        self._cache = cache

    def committed_elsewhere(self, notices: list[bytes]) -> None:
        """Other workers committed these (``hub_protocol.encode_events``), in any order."""
        by_stream: dict[str, list[EncodedEvent]] = {}
        for notice in notices:
            for event in decode_events(notice):
                by_stream.setdefault(event[1], []).append(event)
        for stream_id, events in by_stream.items():
            entry = self._cache.get(stream_id)
            if entry is None:
                continue
            # Notices of two workers on one stream may come in either order.
            events.sort(key=_VERSION)
            if not self._caught_up(entry, events) and entry.head.version < _VERSION(events[-1]):
                self._cache.mark_stale(stream_id)

    def _caught_up(self, entry: CachedStream, events: list[EncodedEvent]) -> bool:
        """Bring ``entry`` up to date with ``events``, if they follow on from it."""
        committed = entry.committed
        if entry.stale or entry.queued is not None or committed is None:
            return False
        first = committed.version + 1
        # Events it holds already (read since, or in an earlier wake-up) are passed over.
        events = [event for event in events if _VERSION(event) >= first]
        if not events:
            return True
        if [_VERSION(event) for event in events] != list(range(first, first + len(events))):
            return False
        try:
            decoded = [
                decode(event_type, schema, data) for _, _, _, event_type, data, schema in events
            ]
        except Exception:  # an event this worker cannot decode: a read will tell
            return False
        aggregate = committed.clone()
        aggregate.replay(decoded)
        self._cache.refresh(aggregate, events[-1][0])
        return True
