"""Subscribe end to end: catch-up, live, handoff under load, filters, checkpoints, resume."""

from __future__ import annotations

import asyncio
import time

import pytest
from orders.v1.event_stream_service_pb2 import SubscribeResponse

from domain.commands import RestockProduct
from domain.ports import RecordedEvent
from server.app import Gateway
from server.bootstrap import bootstrap
from server.rpc.subscription_hub import EventFilter, HubTuning, SubscriptionHub
from server.stores.memory import MemoryEventStore
from tests.clients import Clients, item, order_request
from tests.subscription_support import (
    SMALL_WINDOW,
    WAIT,
    CountingStore,
    JitteryStore,
    StreamReader,
    WrappedStore,
    connect,
    identities,
    run_writers,
    running_gateway,
    stored,
)

# Small pages and buffers, so that every path (multi-page catch-up, handoff, falling
# behind) runs with a few hundred events instead of hundreds of thousands.
SMALL = HubTuning(page_size=7, buffer_size=16, poll_interval=0.05, checkpoint_interval=0.2)


async def test_catch_up_then_live(clients: Clients) -> None:
    for n in range(5):
        await clients.restock(f"sku-{n}", 1)
    reader = StreamReader.open(clients)

    history = await reader.through(5)
    assert [e.position for e in history] == [1, 2, 3, 4, 5]
    assert [e.event_type for e in history] == ["ProductRestocked"] * 5
    assert await reader.next_checkpoint() == 5, "caught up: a checkpoint at the head"

    created = await clients.create(order_request(item("sku-0")))
    live = await reader.through(7)
    assert identities(live[5:]) == identities(created)
    assert live[5].order_created.order_id == created[0].order_created.order_id
    reader.call.cancel()


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
async def test_handoff_under_concurrent_writers_has_no_gap_and_no_duplicate(
    seed: int | None,
) -> None:
    store = MemoryEventStore() if seed is None else JitteryStore(seed)
    async with running_gateway(store, SMALL) as gateway, connect(gateway) as clients:
        writing = asyncio.create_task(run_writers(clients, writers=4, orders=100))
        readers: list[StreamReader] = []
        # Subscribe every few dozen commits while the writers run flat out, so that
        # handoffs happen all along, at many different distances behind the head.
        next_subscription = 0
        while not writing.done():
            if await store.head_position() >= next_subscription:
                readers.append(StreamReader.open(clients))
                next_subscription += 40
            await asyncio.sleep(0.002)
        await writing
        head = await store.head_position()
        assert head == 4 * (1 + 2 * 100)
        expected = await stored(store)
        assert [position for position, _ in expected] == list(range(1, head + 1))
        assert len(readers) >= 10
        for reader in readers:
            assert identities(await reader.through(head)) == expected
            reader.call.cancel()


async def test_event_type_filter(gateway: Gateway, clients: Clients) -> None:
    await clients.restock("sku-1", 10)
    first = await clients.create(order_request(item("sku-1")))
    await clients.cancel(first[0].order_created.order_id)
    await clients.create(order_request(item("sku-1")))
    reader = StreamReader.open(clients, event_types=["OrderCreated", "OrderCancelled"])

    events = await reader.through(await gateway.store.head_position())
    assert [e.event_type for e in events] == ["OrderCreated", "OrderCancelled", "OrderCreated"]
    assert [e.position for e in events] == [2, 4, 6]
    reader.call.cancel()


async def test_stream_filter_live_and_combined_with_types() -> None:
    async with running_gateway(tuning=SMALL) as gateway, connect(gateway) as clients:
        await clients.restock("sku-1", 10)
        await clients.restock("sku-2", 10)
        only_sku1 = StreamReader.open(clients, stream_id="product-sku-1")
        reserved_sku1 = StreamReader.open(
            clients, stream_id="product-sku-1", event_types=["StockReserved"]
        )
        assert await only_sku1.next_checkpoint() == 2
        assert await reserved_sku1.next_checkpoint() == 2

        await clients.create(order_request(item("sku-2"), item("sku-1", 2)))
        await clients.restock("sku-1", 1)

        head = await gateway.store.head_position()
        events = await only_sku1.through(head)
        assert [(e.event_type, e.position) for e in events] == [
            ("ProductRestocked", 1),
            ("StockReserved", 5),
            ("ProductRestocked", 6),
        ]
        assert {e.stream_id for e in events} == {"product-sku-1"}
        reserved = await reserved_sku1.through(head)
        assert [(e.event_type, e.position) for e in reserved] == [("StockReserved", 5)]
        assert reserved[0].stock_reserved.quantity == 2
        only_sku1.call.cancel()
        reserved_sku1.call.cancel()


async def test_idle_filtered_stream_gets_checkpoints_up_to_the_head() -> None:
    async with running_gateway(tuning=SMALL) as gateway, connect(gateway) as clients:
        await clients.restock("sku-1", 1)
        reader = StreamReader.open(clients, event_types=["OrderCancelled"])
        assert await reader.next_checkpoint() == 1

        for n in range(20):
            await clients.restock(f"sku-{n}", 1)
        # Nothing matches, yet the checkpoints move on to the head, so a consumer can
        # store its progress; each one is at most the committed head.
        while await reader.next_checkpoint() < 21:
            assert reader.checkpoints[-1] <= await gateway.store.head_position()
        assert reader.events == []
        # And with no writes at all, checkpoints keep coming at the same position.
        assert await reader.next_checkpoint() == 21
        reader.call.cancel()


async def test_by_default_a_quiet_filtered_stream_checkpoints_within_5_seconds() -> None:
    """The API promises a Checkpoint at least every 5 s while nothing matching arrives:
    consumers size their idle timeouts by it. Every other test tunes the hub its own way."""
    async with running_gateway() as gateway, connect(gateway) as clients:
        reader = StreamReader.open(clients, event_types=["OrderCancelled"])
        assert await reader.next_checkpoint() == 0, "caught up: a checkpoint at once"
        quiet_since = time.monotonic()
        await clients.restock("sku-1", 1)

        assert await reader.next_checkpoint() == 1
        # 5 s and the time to deliver it; well short of what twice the interval would take.
        waited = time.monotonic() - quiet_since
        assert waited < 7, f"the next checkpoint came after {waited:.1f} s"
        assert reader.events == []
        reader.call.cancel()


class SlowPagesStore(WrappedStore):
    """Reads of the log that take a while per page, once ``slow`` is set: a long
    history takes many of them to catch up through."""

    def __init__(self) -> None:
        super().__init__()
        self.slow = False

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        if self.slow:
            await asyncio.sleep(0.05)
        return await super().read_all(after_position, limit)


async def test_a_filtered_catch_up_through_a_long_history_checkpoints_on_the_way() -> None:
    """A consumer can store its progress during a long catch-up with nothing to deliver,
    not only once it has caught up: a restart then does not start over from the beginning."""
    store = SlowPagesStore()
    tuning = HubTuning(page_size=10, poll_interval=0.05, checkpoint_interval=0.2)
    async with running_gateway(store, tuning) as gateway, connect(gateway) as clients:
        await run_writers(clients, writers=4, orders=25)
        head = await store.head_position()
        assert head == 4 * (1 + 2 * 25)
        # About 21 pages of 50 ms each: 1 s of catch-up, five checkpoint intervals.
        store.slow = True
        reader = StreamReader.open(clients, event_types=["OrderCancelled"])

        first = await reader.next_checkpoint()
        assert 0 < first < head, "a checkpoint before having caught up"
        while await reader.next_checkpoint() < head:
            pass
        assert reader.checkpoints == sorted(reader.checkpoints)
        assert reader.events == []
        reader.call.cancel()


async def test_resume_from_a_stored_position_has_no_duplicates(clients: Clients) -> None:
    for n in range(10):
        await clients.restock(f"sku-{n}", 1)
    first = StreamReader.open(clients)
    seen = await first.through(4)
    stored_position = seen[-1].position
    first.call.cancel()

    for n in range(10, 13):
        await clients.restock(f"sku-{n}", 1)
    resumed = StreamReader.open(clients, after_position=stored_position)
    rest = await resumed.through(13)
    assert [e.position for e in rest] == list(range(stored_position + 1, 14))
    assert {e.event_id for e in seen}.isdisjoint(e.event_id for e in rest)
    resumed.call.cancel()


async def test_from_end_delivers_only_new_events_and_wins_over_after_position(
    clients: Clients,
) -> None:
    for n in range(5):
        await clients.restock(f"sku-{n}", 1)
    reader = StreamReader.open(clients, from_end=True, after_position=2)
    assert await reader.next_checkpoint() == 5
    new = await clients.restock("sku-new", 1)
    events = await reader.through(6)
    assert identities(events) == identities(new)
    reader.call.cancel()


async def test_after_position_beyond_the_head_never_checkpoints_beyond_it(
    clients: Clients,
) -> None:
    await clients.restock("sku-1", 1)
    reader = StreamReader.open(clients, after_position=3)
    assert await reader.next_checkpoint() == 1
    for n in range(4):
        await clients.restock(f"sku-{n}", 1)
    events = await reader.through(5)
    assert [e.position for e in events] == [4, 5]
    reader.call.cancel()


async def test_a_start_beyond_the_head_neither_checkpoints_past_it_nor_stalls_the_others() -> None:
    store = CountingStore()
    async with running_gateway(store, SMALL) as gateway, connect(gateway) as clients:
        await clients.restock("sku-1", 1)
        ahead = StreamReader.open(clients, after_position=1000)
        assert await ahead.next_checkpoint() == 1
        # The quiet checkpoints that follow are still at most the committed head.
        assert await ahead.next_checkpoint() == 1

        # A subscriber that starts at the head goes live beside it: it is woken by the
        # shared reader, instead of polling the store on its own without pause.
        behind = StreamReader.open(clients)
        assert [e.position for e in await behind.through(1)] == [1]
        await behind.next_checkpoint()
        reads_before = store.reads
        await asyncio.sleep(10 * SMALL.poll_interval)
        assert store.reads - reads_before < 100, "a caught-up subscriber polls the store"

        await clients.restock("sku-2", 1)
        assert [e.position for e in await behind.through(2)] == [1, 2]
        assert await ahead.through(2) == [], "events at or below 1000 are never delivered"
        assert max(ahead.checkpoints) == 2
        ahead.call.cancel()
        behind.call.cancel()


async def test_fifty_concurrent_subscribers_see_the_same_sequence() -> None:
    async with running_gateway(tuning=SMALL) as gateway, connect(gateway) as clients:
        await run_writers(clients, writers=2, orders=5, prefix="before")
        readers = [StreamReader.open(clients) for _ in range(60)]
        await run_writers(clients, writers=3, orders=20, prefix="during")
        head = await gateway.store.head_position()
        expected = await stored(gateway.store)
        for reader in readers:
            assert identities(await reader.through(head)) == expected
            reader.call.cancel()


async def test_live_subscribers_share_one_reader_of_the_store() -> None:
    store = CountingStore()
    async with running_gateway(store) as gateway, connect(gateway) as clients:
        readers = [StreamReader.open(clients) for _ in range(60)]
        for reader in readers:
            await reader.next_checkpoint()
        reads_before = store.reads
        for n in range(10):
            await clients.restock(f"sku-{n}", 1)
        expected = await stored(store.inner)
        for reader in readers:
            assert identities(await reader.through(10)) == expected
            reader.call.cancel()
        # One hub read per wake-up (and the odd poll), however many subscribers: sixty
        # subscriptions each querying for themselves would need sixty reads at least.
        assert store.reads - reads_before < len(readers)


async def test_slow_consumer_gets_everything_without_holding_back_others() -> None:
    async with (
        running_gateway(tuning=SMALL) as gateway,
        connect(gateway) as clients,
        connect(gateway, SMALL_WINDOW) as slow_clients,
    ):
        slow = StreamReader.open(slow_clients)
        fast = StreamReader.open(clients)
        assert await slow.next_checkpoint() == 0
        assert await fast.next_checkpoint() == 0

        # The slow consumer reads nothing at all while writers run: the fast one must
        # still receive everything, and the hub must not buffer for the slow one forever.
        await run_writers(clients, writers=4, orders=250)
        head = await gateway.store.head_position()
        expected = await stored(gateway.store)
        assert identities(await fast.through(head)) == expected
        assert len(slow.events) == 0
        assert gateway.hub.fallbacks >= 1, "the stalled subscriber fell back to the store"

        # Reading slowly now while more commits arrive, it still gets everything in order.
        writing = asyncio.create_task(run_writers(clients, writers=2, orders=20, prefix="late"))
        while not writing.done():
            await slow.next()
            await asyncio.sleep(0.001)
        await writing
        head = await gateway.store.head_position()
        expected = await stored(gateway.store)
        assert identities(await slow.through(head)) == expected
        assert identities(await fast.through(head)) == expected
        slow.call.cancel()
        fast.call.cancel()


async def test_events_offered_as_a_quiet_wait_times_out_are_delivered_not_skipped() -> None:
    # The hub can offer events in the same turn of the event loop as a live subscriber's
    # quiet timeout fires; the subscriber then wakes with the timeout although it has
    # events to send, and must send them rather than checkpoint past them.
    store = MemoryEventStore()
    bus = bootstrap(store)
    await bus.dispatch(RestockProduct(product_id="sku-1", quantity=1))
    hub = SubscriptionHub(store, 10, HubTuning(checkpoint_interval=0.05, poll_interval=10))
    await hub.start()
    received: asyncio.Queue[SubscribeResponse] = asyncio.Queue()

    async def consume() -> None:
        async with hub.subscribe(EventFilter(), 0, False) as subscription:
            async for response in subscription.responses():
                await received.put(response)

    consumer = asyncio.create_task(consume())
    try:
        assert (await asyncio.wait_for(received.get(), WAIT)).event.position == 1
        assert (await asyncio.wait_for(received.get(), WAIT)).checkpoint.position == 1
        for _ in range(5):
            await asyncio.sleep(0)  # the subscriber, now live, waits for events or silence
        await bus.dispatch(RestockProduct(product_id="sku-2", quantity=1))  # wakes the hub
        # Block the loop past the subscriber's quiet timeout: the hub's wake-up and the
        # timeout are then due in the same turn, the hub first.
        time.sleep(0.1)  # noqa: ASYNC251 (blocking the loop is the point)
        following = await asyncio.wait_for(received.get(), WAIT)
        assert following.WhichOneof("message") == "event", following
        assert following.event.position == 2
    finally:
        consumer.cancel()
        await hub.stop()


async def test_the_hub_tells_when_its_first_subscription_opens_and_its_last_ends() -> None:
    hub = SubscriptionHub(MemoryEventStore(), 10, HubTuning(poll_interval=10))
    await hub.start()
    heard: list[bool] = []
    hub.on_subscribed = heard.append
    try:
        async with hub.subscribe(EventFilter(), 0, False):
            assert heard == [True]
            async with hub.subscribe(EventFilter(), 0, True):
                pass
            assert heard == [True]  # one subscription is still open
        assert heard == [True, False]
        async with hub.subscribe(EventFilter(), 0, False):
            pass
        assert heard == [True, False, True, False]
    finally:
        await hub.stop()
