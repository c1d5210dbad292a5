"""The aggregate cache's follower: another worker's commits, carried by the hub's wake-up,
bring the streams this worker holds up to date without a read; where they cannot (a gap,
a commit of its own queued, an event it cannot decode), the stream is marked stale."""

from __future__ import annotations

import asyncio
import uuid

from domain.aggregates import Product
from domain.mapper import to_new_event
from domain.ports import NewEvent
from domain.unit_of_work import AggregateCache
from server.workers.cache_follower import CacheFollower
from server.workers.hub_protocol import encode_events


def committed(product_id: str, restocks: int) -> Product:
    product = Product(product_id)
    for _ in range(restocks):
        product.restock(10)
    product.mark_committed()
    return product


def restocks(product: Product, *quantities: int) -> list[NewEvent]:
    """``product`` restocked by each quantity, as another worker commits it."""
    events = []
    for quantity in quantities:
        product.restock(quantity)
        event = product.pending[-1]
        events.append(to_new_event(event, str(uuid.uuid4()), product.stream_id, product.version))
    product.mark_committed()
    return events


def cached(*products: Product) -> AggregateCache:
    cache = AggregateCache(10)
    for product in products:
        cache.refresh(product.clone(), f"event-{product.id}")
    return cache


def test_another_worker_s_commits_bring_a_cached_stream_up_to_date_without_a_read() -> None:
    mine = committed("p", 2)
    cache = cached(mine)
    theirs = mine.clone()
    first, second = restocks(theirs, 5), restocks(theirs, 1, 2)

    held = restocks(committed("p", 1), 10)  # version 2, which this worker holds already
    # Two commits, their notices in either order, behind one it has.
    notices = [encode_events(held), encode_events(second), encode_events(first)]
    CacheFollower(cache).committed_elsewhere(notices)

    entry = cache.get(mine.stream_id)
    assert entry is not None and not entry.stale and entry.queued is None
    assert isinstance(entry.committed, Product) and entry.head is entry.committed
    assert (entry.committed.version, entry.committed.available) == (5, 28)
    assert entry.committed_event == second[-1].event_id


def test_streams_that_cannot_be_brought_up_to_date_are_stale_and_the_rest_untouched() -> None:
    gap, current, unknown = committed("gap", 1), committed("current", 2), Product("unknown")
    cache = cached(gap, current)
    ahead_of_it = gap.clone()
    restocks(ahead_of_it, 1)  # a commit this worker has not heard of
    skipped = restocks(ahead_of_it, 2)
    already = restocks(committed("current", 1), 4)  # version 2, which this worker holds

    CacheFollower(cache).committed_elsewhere(
        [encode_events(skipped), encode_events(already), encode_events(restocks(unknown, 1))]
    )

    gap_entry, current_entry = cache.get(gap.stream_id), cache.get(current.stream_id)
    assert gap_entry is not None and gap_entry.stale
    assert gap_entry.committed is not None and gap_entry.committed.version == 1
    assert current_entry is not None and not current_entry.stale
    assert current_entry.committed is not None and current_entry.committed.version == 2
    assert cache.get(unknown.stream_id) is None


async def test_a_stream_with_a_commit_of_its_own_queued_is_marked_stale_not_replaced() -> None:
    mine = committed("p", 1)
    cache = cached(mine)
    head = mine.clone()
    head.restock(1)
    queued: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    cache.stage(head, "mine", queued)

    # Versions 2 and 3 from another worker: this worker's queued version 2 will conflict.
    CacheFollower(cache).committed_elsewhere([encode_events(restocks(mine.clone(), 5, 6))])

    entry = cache.get(mine.stream_id)
    assert entry is not None and entry.stale
    assert entry.head is head and entry.queued is queued
