"""Two gateway replicas on one real PostgreSQL database, every caller on one product.

Replicas take turns at a contended stream at the database (``domain.locks.StreamTurns``)
instead of racing each other to concurrency conflicts: every order succeeds, however the
callers interleave, and the stock arithmetic is exact.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import grpc
import pytest

from domain.events import StockReserved
from domain.mapper import to_domain_event
from domain.ports import RecordedEvent
from server.stores.factory import open_store
from tests.clients import item, order_request
from tests.hot_support import assert_never_oversold, place_mixed_orders, place_orders
from tests.subscription_support import connect, running_gateway

CALLERS = 8
"""On each replica."""
ORDERS = 25
"""Per caller, one after another."""
STOCK = 1_000
HOT = "sku-hot"


async def test_two_replicas_queue_at_the_database_and_every_order_succeeds(
    fresh_postgres_url: str,
) -> None:
    first_store = await open_store(fresh_postgres_url)
    second_store = await open_store(fresh_postgres_url)
    failures: Counter[str] = Counter()
    async with (
        running_gateway(first_store) as first,
        running_gateway(second_store) as second,
        connect(first) as on_first,
        connect(second) as on_second,
    ):
        await on_first.restock(HOT, STOCK)
        placed = await asyncio.wait_for(
            asyncio.gather(
                *(place_orders(on_first, HOT, ORDERS, failures) for _ in range(CALLERS)),
                *(place_orders(on_second, HOT, ORDERS, failures) for _ in range(CALLERS)),
            ),
            timeout=120,
        )
        stream: list[RecordedEvent] = await first_store.read_stream(f"product-{HOT}")
        positions = [event.position for event in await first_store.read_all(0, 10_000)]

    assert failures == Counter(), "every call succeeded"
    orders = [order_id for caller in placed for order_id in caller]
    total = 2 * CALLERS * ORDERS
    assert len(set(orders)) == total
    # The product's stream: the restock, then one reservation per order, each leaving one
    # unit less than the one before it, whichever replica wrote it.
    assert [event.event_type for event in stream] == ["ProductRestocked"] + [
        "StockReserved"
    ] * total
    assert [event.stream_version for event in stream] == list(range(1, total + 2))
    reserved = [to_domain_event(event) for event in stream[1:]]
    left = [event.available_after for event in reserved if isinstance(event, StockReserved)]
    assert left == list(range(STOCK - 1, STOCK - total - 1, -1))
    assert positions == list(range(1, len(positions) + 1)), "positions have no gap"


async def mixed_orders_on_two_replicas(
    url: str,
    products: list[str],
    stock: int,
    callers: int,
    orders: int,
    rng: random.Random,
    most: int | None = None,
) -> tuple[Counter[str], list[list[RecordedEvent]], float]:
    """``callers`` on each of two replicas of ``url``'s database place ``orders`` orders
    each of one to all of ``products`` (or to ``most``), each product restocked with
    ``stock`` first. Returns the failures by status code, each product's stream, and the
    seconds the orders took."""
    first_store = await open_store(url)
    second_store = await open_store(url)
    failures: Counter[str] = Counter()
    async with (
        running_gateway(first_store) as first,
        running_gateway(second_store) as second,
        connect(first) as on_first,
        connect(second) as on_second,
    ):
        for product in products:
            await on_first.restock(product, stock)
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(
            asyncio.gather(
                *(
                    place_mixed_orders(clients, products, orders, rng, failures, most)
                    for clients in (on_first, on_second)
                    for _ in range(callers)
                ),
            ),
            timeout=120,
        )
        elapsed = asyncio.get_running_loop().time() - started
        streams = [await first_store.read_stream(f"product-{p}") for p in products]
    return failures, streams, elapsed


async def test_two_replicas_with_orders_over_several_hot_products_never_deadlock(
    fresh_postgres_url: str,
) -> None:
    """Orders of one to three of three products, items in any order, from both replicas:
    their turns at the products are taken in sorted order, so nothing deadlocks (in the
    process or in PostgreSQL), nothing is ABORTED, and no product is oversold."""
    failures, streams, _ = await mixed_orders_on_two_replicas(
        fresh_postgres_url, ["sku-a", "sku-b", "sku-c"], 150, CALLERS, 15, random.Random(11)
    )

    assert set(failures) <= {"FAILED_PRECONDITION"}, "only refusals for lack of stock"
    for stream in streams:
        assert_never_oversold(stream)


async def test_two_replicas_contending_for_many_products_never_wait_out_the_pool(
    fresh_postgres_url: str,
) -> None:
    """Orders of one to three of more contended products than a replica has pooled
    connections: a replica's turns at them hold the products' locks while the commands in
    them load and append, so the locks must never take the connections those loads and
    appends need (they would wait for each other until the pool's timeout, answered
    UNAVAILABLE), nor a connection each."""
    products = [f"sku-{n:02d}" for n in range(24)]
    failures, streams, elapsed = await mixed_orders_on_two_replicas(
        fresh_postgres_url, products, 10_000, 2 * CALLERS, 20, random.Random(5), most=3
    )

    assert failures == Counter(), "every call succeeded"
    assert elapsed < 60
    for stream in streams:
        assert_never_oversold(stream)


async def test_a_product_one_replica_created_is_known_to_the_other_at_once(
    fresh_postgres_url: str,
) -> None:
    first_store = await open_store(fresh_postgres_url)
    second_store = await open_store(fresh_postgres_url)
    async with (
        running_gateway(first_store) as first,
        running_gateway(second_store) as second,
        connect(first) as on_first,
        connect(second) as on_second,
    ):
        # The second replica looks the product up before it exists (a sale not yet open).
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await on_second.create(order_request(item("sku-new", 1)))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        await on_first.restock("sku-new", 5)
        events = await on_second.create(order_request(item("sku-new", 1)))
    assert [event.event_type for event in events] == ["OrderCreated", "StockReserved"]
