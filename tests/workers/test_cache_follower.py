"""The aggregate cache's follower stops when told, even when a read cancelled under it
ends in the store's error instead of the cancellation (the loop survives store errors by
design, so cancellation alone would leave it waiting for the next wake-up for ever)."""

from __future__ import annotations

import asyncio

from domain.errors import StoreUnavailableError
from domain.ports import RecordedEvent
from domain.unit_of_work import AggregateCache
from server.stores.memory import MemoryEventStore
from server.workers.cache_follower import CacheFollower

WAIT = 10.0


class CancelledReadsFail(MemoryEventStore):
    """A store whose reads, once cancelled, raise its own error (as a closing pool's may)."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        self.reading.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise StoreUnavailableError("the pool is closed") from None
        return []


async def test_a_follower_whose_cancelled_read_fails_still_stops() -> None:
    store = CancelledReadsFail()
    follower = CacheFollower(store, AggregateCache(10))
    await follower.start()
    follower.wake()
    await asyncio.wait_for(store.reading.wait(), WAIT)

    await asyncio.wait_for(follower.stop(), WAIT)
