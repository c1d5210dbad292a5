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

from domain.events import ProductRestocked, StockReserved
from domain.mapper import to_domain_event
from domain.ports import RecordedEvent
from server.stores.factory import open_store
from tests.clients import Clients, item, order_request
from tests.subscription_support import connect, running_gateway

CALLERS = 8
"""On each replica."""
ORDERS = 25
"""Per caller, one after another."""
STOCK = 1_000
HOT = "sku-hot"


async def place_orders(clients: Clients, failures: Counter[str]) -> list[str]:
    placed = []
    for _ in range(ORDERS):
        try:
            events = await clients.create(order_request(item(HOT)))
        except grpc.aio.AioRpcError as error:
            failures[error.code().name] += 1
            continue
        placed.append(events[0].order_created.order_id)
    return placed


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
                *(place_orders(on_first, failures) for _ in range(CALLERS)),
                *(place_orders(on_second, failures) for _ in range(CALLERS)),
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


async def test_two_replicas_with_orders_over_several_hot_products_never_deadlock(
    fresh_postgres_url: str,
) -> None:
    """Orders of one to three of three products, items in any order, from both replicas:
    their turns at the products are taken in sorted order, so nothing deadlocks (in the
    process or in PostgreSQL), nothing is ABORTED, and no product is oversold."""
    products = ["sku-a", "sku-b", "sku-c"]
    first_store = await open_store(fresh_postgres_url)
    second_store = await open_store(fresh_postgres_url)
    failures: Counter[str] = Counter()
    rng = random.Random(11)

    async def caller(clients: Clients) -> None:
        for _ in range(15):
            chosen = rng.sample(products, rng.randint(1, 3))
            request = order_request(*(item(p, rng.randint(1, 2)) for p in chosen))
            try:
                await clients.create(request)
            except grpc.aio.AioRpcError as error:
                failures[error.code().name] += 1

    async with (
        running_gateway(first_store) as first,
        running_gateway(second_store) as second,
        connect(first) as on_first,
        connect(second) as on_second,
    ):
        for product in products:
            await on_first.restock(product, 150)
        await asyncio.wait_for(
            asyncio.gather(
                *(caller(on_first) for _ in range(CALLERS)),
                *(caller(on_second) for _ in range(CALLERS)),
            ),
            timeout=120,
        )
        streams = [await first_store.read_stream(f"product-{p}") for p in products]

    assert set(failures) <= {"FAILED_PRECONDITION"}, "only refusals for lack of stock"
    for stream in streams:
        left = 0
        for event in map(to_domain_event, stream):
            assert isinstance(event, ProductRestocked | StockReserved)
            left += event.quantity if isinstance(event, ProductRestocked) else -event.quantity
            assert event.available_after == left >= 0
