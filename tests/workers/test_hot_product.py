"""``serve --workers 2`` with every caller on one product, on SQLite and PostgreSQL.

The workers take turns at a contended product (``domain.locks.StreamTurns``) instead of
racing each other to concurrency conflicts until the retries run out: every order
succeeds, however the callers interleave, and the stock arithmetic is exact.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc

from domain.events import StockReserved
from domain.mapper import to_domain_event
from server.stores.factory import open_store
from tests.clients import Clients, item, order_request
from tests.workers_support import spread_clients, workers_gateway

CHANNELS = 16
"""Connections, each with one caller: all on one worker is a 2^-15 chance."""
ORDERS = 30
"""Per caller, one after another."""
STOCK = 1_000
HOT = "sku-hot"


async def place_orders(clients: Clients, failures: Counter[str]) -> int:
    placed = 0
    for _ in range(ORDERS):
        try:
            await clients.create(order_request(item(HOT)))
        except grpc.aio.AioRpcError as error:
            failures[error.code().name] += 1
            continue
        placed += 1
    return placed


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
            asyncio.gather(*(place_orders(c, failures) for c in clients)), timeout=120
        )

    assert failures == Counter(), "every call succeeded"
    total = CHANNELS * ORDERS
    assert sum(placed) == total
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
