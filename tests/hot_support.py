"""What the hot-product tests share: callers placing orders on one product or on several,
and the stock arithmetic every product's stream must show afterwards."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import grpc

from domain.events import ProductRestocked, StockReserved
from domain.mapper import to_domain_event
from domain.ports import RecordedEvent
from tests.clients import Clients, item, order_request


async def place_orders(
    clients: Clients, product: str, orders: int, failures: Counter[str]
) -> list[str]:
    """Place ``orders`` orders of one unit of ``product``, one after another; the ids of
    the orders placed (``failures`` counts the others by status code)."""
    placed = []
    for _ in range(orders):
        try:
            events = await clients.create(order_request(item(product)))
        except grpc.aio.AioRpcError as error:
            failures[error.code().name] += 1
            continue
        placed.append(events[0].order_created.order_id)
    return placed


async def place_mixed_orders(
    clients: Clients,
    products: Sequence[str],
    orders: int,
    rng: random.Random,
    failures: Counter[str],
    most: int | None = None,
) -> None:
    """Place ``orders`` orders of one to all of ``products`` (or to ``most`` of them), items
    in any order."""
    for _ in range(orders):
        chosen = rng.sample(list(products), rng.randint(1, most or len(products)))
        request = order_request(*(item(p, rng.randint(1, 2)) for p in chosen))
        try:
            await clients.create(request)
        except grpc.aio.AioRpcError as error:
            failures[error.code().name] += 1


def assert_never_oversold(stream: Sequence[RecordedEvent]) -> None:
    """A product's stream: restocks and reservations only, each leaving the stock its
    ``available_after`` says, never below zero."""
    left = 0
    for event in map(to_domain_event, stream):
        assert isinstance(event, ProductRestocked | StockReserved)
        left += event.quantity if isinstance(event, ProductRestocked) else -event.quantity
        assert event.available_after == left >= 0
