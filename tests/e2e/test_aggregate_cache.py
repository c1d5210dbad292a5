"""``aggregate_cache``: how many aggregates the gateway keeps between commands.

What an operator sees is store reads: a command on an order or product still kept is
decided without reading its stream; one that is not kept reads the stream back first, and
decides the same.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from domain.ports import RecordedEvent
from server.config import Settings
from server.stores.memory import MemoryEventStore
from tests.clients import item, order_request
from tests.subscription_support import connect, running_gateway


class ReadCountingStore(MemoryEventStore):
    def __init__(self) -> None:
        super().__init__()
        self.streams_read: list[str] = []

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        self.streams_read.append(stream_id)
        return await super().read_stream(stream_id, after_version)


@pytest.mark.parametrize(("capacity", "reads_back"), [(10_000, False), (0, True)])
async def test_cancel_reads_the_order_back_only_when_it_was_not_kept(
    capacity: int, reads_back: bool
) -> None:
    store = ReadCountingStore()
    async with (
        running_gateway(store, aggregate_cache=capacity) as gateway,
        connect(gateway) as clients,
    ):
        await clients.restock("sku-1", 5)
        created = await clients.create(order_request(item("sku-1", quantity=2)))
        order_id = created[0].order_created.order_id
        store.streams_read.clear()
        cancelled = await clients.cancel(order_id)
        assert [e.event_type for e in cancelled] == ["OrderCancelled", "StockReleased"]
        # Decided the same either way: the two units are back in stock.
        assert cancelled[1].stock_released.available_after == 5
    assert (f"order-{order_id}" in store.streams_read) is reads_back
    assert ("product-sku-1" in store.streams_read) is reads_back


def test_a_negative_size_is_refused() -> None:
    with pytest.raises(ValidationError, match="aggregate_cache"):
        Settings(aggregate_cache=-1)
