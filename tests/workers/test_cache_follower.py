"""The aggregate cache's follower: another worker's commit marks a cached stream stale only
where this worker holds it at an older version, and reads nothing to know it."""

from __future__ import annotations

from domain.aggregates import Product
from domain.unit_of_work import AggregateCache
from server.workers.cache_follower import CacheFollower


def at_version(product_id: str, version: int) -> Product:
    product = Product(product_id)
    product.restock(version)
    for _ in range(version - 1):
        product.restock(1)
    product.mark_committed()
    assert product.version == version
    return product


def test_streams_moved_past_the_cached_version_are_stale_and_the_others_are_not() -> None:
    cache = AggregateCache(10)
    for product_id, version in (("behind", 2), ("current", 3), ("ahead", 4)):
        cache.refresh(at_version(product_id, version), f"event-{product_id}")

    moved = [("behind", 3), ("current", 3), ("ahead", 3), ("unknown", 9)]
    CacheFollower(cache).moved([(Product(pid).stream_id, version) for pid, version in moved])

    stale = {
        stream_id: entry.stale
        for stream_id in ("behind", "current", "ahead")
        if (entry := cache.get(Product(stream_id).stream_id)) is not None
    }
    assert stale == {"behind": True, "current": False, "ahead": False}
    assert cache.get(Product("unknown").stream_id) is None
