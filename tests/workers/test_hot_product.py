"""``serve --workers 2`` with every caller on one product, on SQLite and PostgreSQL.

The workers take turns at a contended product (``domain.locks.StreamTurns``) instead of
racing each other to concurrency conflicts until the retries run out: every order
succeeds, however the callers interleave, and the stock arithmetic is exact.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from domain.events import StockReserved
from domain.mapper import to_domain_event
from server.stores.factory import open_store
from tests.hot_support import assert_never_oversold, place_mixed_orders, place_orders
from tests.workers_support import spread_clients, workers_gateway

CHANNELS = 16
"""Connections, each with one caller: all on one worker is a 2^-15 chance."""
ORDERS = 30
"""Per caller, one after another."""
STOCK = 1_000
HOT = "sku-hot"


async def test_workers_take_turns_at_a_hot_product_and_every_order_succeeds(
    store_url: str,
) -> None:
    failures: Counter[str] = Counter()
    async with (
        workers_gateway(store_url) as gateway,
        spread_clients(gateway.target, CHANNELS) as clients,
    ):
        await clients[0].restock(HOT, STOCK)
        placed = await asyncio.wait_for(
            asyncio.gather(*(place_orders(c, HOT, ORDERS, failures) for c in clients)), timeout=120
        )

    assert failures == Counter(), "every call succeeded"
    total = CHANNELS * ORDERS
    assert sum(len(p) for p in placed) == total
    store = await open_store(store_url)
    try:
        stream = await store.read_stream(f"product-{HOT}")
    finally:
        await store.close()
    # The restock, then one reservation per order, each leaving one unit less than the
    # one before it, whichever worker wrote it.
    assert [event.stream_version for event in stream] == list(range(1, total + 2))
    reserved = [to_domain_event(event) for event in stream[1:]]
    left = [event.available_after for event in reserved if isinstance(event, StockReserved)]
    assert left == list(range(STOCK - 1, STOCK - total - 1, -1))


async def test_workers_with_orders_over_several_hot_products_never_deadlock(
    store_url: str,
) -> None:
    """Orders of one to three of three products, items in any order, through both
    workers: their turns at the products are taken in sorted order, so nothing
    deadlocks, nothing is ABORTED, and no product is oversold."""
    products = ["sku-a", "sku-b", "sku-c"]
    failures: Counter[str] = Counter()
    rng = random.Random(11)

    async with (
        workers_gateway(store_url) as gateway,
        spread_clients(gateway.target, CHANNELS) as clients,
    ):
        for product in products:
            await clients[0].restock(product, 400)
        await asyncio.wait_for(
            asyncio.gather(
                *(place_mixed_orders(c, products, ORDERS, rng, failures) for c in clients)
            ),
            timeout=120,
        )

    assert set(failures) <= {"FAILED_PRECONDITION"}, "only refusals for lack of stock"
    store = await open_store(store_url)
    try:
        streams = [await store.read_stream(f"product-{p}") for p in products]
    finally:
        await store.close()
    for stream in streams:
        assert_never_oversold(stream)
