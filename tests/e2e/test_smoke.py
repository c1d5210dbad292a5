"""End-to-end: one of each command against a real server on 127.0.0.1:0."""

from __future__ import annotations

from tests.clients import Clients, item, order_request


async def test_restock_then_order_streams_committed_events(clients: Clients) -> None:
    restocked = await clients.restock("sku-1", 5)
    assert [e.event_type for e in restocked] == ["ProductRestocked"]
    assert restocked[0].product_restocked.available_after == 5

    created = await clients.create(order_request(item("sku-1", 2)))
    assert [e.event_type for e in created] == ["OrderCreated", "StockReserved"]
    assert created[1].stock_reserved.available_after == 3
    assert [e.position for e in created] == [2, 3]
