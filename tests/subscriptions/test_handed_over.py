"""A store that hands the hub the events each commit recorded (a worker of ``--workers N``
on SQLite): live subscribers get them without the hub reading the store, and anything
that does not continue exactly where the hub stands is read, never skipped."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from orders.v1.event_stream_service_pb2 import SubscribeResponse

from domain.commands import RestockProduct
from domain.ports import Commit, RecordedEvent
from server.bootstrap import bootstrap
from server.rpc.subscription_hub import EventFilter, HubTuning, SubscriptionHub
from tests.subscription_support import WAIT, CountingStore

# No poll within the test: what arrives came through a wake-up or a handover.
NO_POLL = HubTuning(poll_interval=60)


class HandingOverStore(CountingStore):
    """Hands each append's events to the recorded listeners while they are wanted, as
    the supervisor's wake-up does, instead of waking commit listeners; a ``withhold``
    append is told to nobody (a lost wake-up), so the next handover starts past a gap."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[Callable[[Sequence[RecordedEvent]], None]] = []
        self.commit_listeners: list[Callable[[], None]] = []
        self.wanted = False
        self.withhold = False

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        self.commit_listeners.append(listener)

    def add_recorded_listener(self, listener: Callable[[Sequence[RecordedEvent]], None]) -> None:
        self.listeners.append(listener)

    def want_recorded(self, wanted: bool) -> None:
        self.wanted = wanted

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        recorded = await self.inner.append(commit)
        if self.withhold:
            return recorded
        if self.wanted:
            for listener in self.listeners:
                listener(recorded)
        else:
            for commit_listener in self.commit_listeners:
                commit_listener()
        return recorded


async def _positions(received: asyncio.Queue[SubscribeResponse], count: int) -> list[int]:
    positions: list[int] = []
    while len(positions) < count:
        response = await asyncio.wait_for(received.get(), WAIT)
        if response.WhichOneof("message") == "event":
            positions.append(response.event.position)
    return positions


async def test_handed_over_events_reach_live_subscribers_without_a_read_and_gaps_are_read() -> None:
    store = HandingOverStore()
    bus = bootstrap(store)
    hub = SubscriptionHub(store, 10, NO_POLL, recorded=store)
    await hub.start()
    received: asyncio.Queue[SubscribeResponse] = asyncio.Queue()

    async def consume() -> None:
        async with hub.subscribe(EventFilter(), 0, False) as subscription:
            async for response in subscription.responses():
                await received.put(response)

    consumer = asyncio.create_task(consume())
    try:
        assert (await asyncio.wait_for(received.get(), WAIT)).checkpoint.position == 0
        assert store.wanted
        reads = store.reads
        for n in range(5):
            await bus.dispatch(RestockProduct(product_id=f"sku-{n}", quantity=1))
        assert await _positions(received, 5) == [1, 2, 3, 4, 5]
        assert store.reads == reads, "handed-over events were read back from the store"

        # One commit nobody hears of: the next handover does not continue at the hub's
        # head, so the hub reads, and delivers both in order.
        store.withhold = True
        await bus.dispatch(RestockProduct(product_id="sku-gap", quantity=1))
        store.withhold = False
        await bus.dispatch(RestockProduct(product_id="sku-after", quantity=1))
        assert await _positions(received, 2) == [6, 7]
        assert store.reads > reads
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        assert not store.wanted, "nobody is live: the store need not hand events over"
    finally:
        consumer.cancel()
        await hub.stop()
