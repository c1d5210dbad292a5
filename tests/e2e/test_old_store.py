"""A store written by the first release (``tests/fixtures/store-v1.db``, made by
``tests/fixtures/make_store_v1.py`` with that release's code), opened by today's gateway:
subscribers read every old event, idempotent retries replay them, and new commands
continue the old streams."""

from __future__ import annotations

import shutil
from pathlib import Path

from orders.v1 import order_command_service_pb2

from server.stores.sqlite import SQLiteEventStore
from tests.clients import address, item, money, order_request
from tests.fixtures import make_store_v1 as fixture
from tests.subscription_support import StreamReader, connect, running_gateway

FIXTURE = Path(__file__).parents[1] / "fixtures" / "store-v1.db"
EVENTS = 13


def copy_of_fixture(tmp_path: Path) -> Path:
    # Opening a store migrates it: never open the committed file itself.
    copy = tmp_path / "events.db"
    shutil.copyfile(FIXTURE, copy)
    return copy


async def test_a_subscriber_reads_every_event_of_an_old_store(tmp_path: Path) -> None:
    store = await SQLiteEventStore.open(copy_of_fixture(tmp_path))
    async with running_gateway(store) as gateway, connect(gateway) as clients:
        events = await StreamReader.open(clients).through(EVENTS)

    assert [e.position for e in events] == list(range(1, EVENTS + 1))
    assert [e.event_type for e in events[:4]] == ["ProductRestocked"] * 3 + ["OrderCreated"]
    first = events[3].order_created
    assert [(i.product_id, i.quantity) for i in first.items] == [("apple", 3), ("pear", 1)]
    assert (first.total.units, first.total.nanos) == (7, 750_000_000)
    # Stored before items had a line total: the upcaster derives it.
    assert [(i.line_total.units, i.line_total.nanos) for i in first.items] == [
        (3, 750_000_000),
        (4, 0),
    ]
    plums = events[8].order_created.items[1]
    assert (plums.line_total.currency_code, plums.line_total.units) == ("EUR", 6)
    assert plums.line_total.nanos == 930_000_000
    assert events[-1].stock_released.available_after == 47


async def test_an_old_command_is_replayed_and_old_streams_continue(tmp_path: Path) -> None:
    store = await SQLiteEventStore.open(copy_of_fixture(tmp_path))
    async with running_gateway(store) as gateway, connect(gateway) as clients:
        command_id, items = fixture.ORDERS[0]
        request = order_command_service_pb2.CreateOrderRequest(
            command_id=command_id,
            customer_id=fixture.CUSTOMER,
            items=[
                item(product, quantity, money(units, nanos))
                for product, quantity, units, nanos in items
            ],
            shipping_address=address(recipient="Ada", line1="1 Road"),
        )
        replayed = await clients.create(request)
        assert [e.position for e in replayed] == [4, 5, 6], "the recorded events, not new ones"
        assert replayed[0].order_created.items[0].line_total.units == 3

        order_id = replayed[0].order_created.order_id
        released = await clients.cancel(order_id)
        assert [e.stock_released.available_after for e in released[1:]] == [50, 15]

        new = await clients.create(
            order_request(item("plum", 3, money(units=2, nanos=500_000_000)), item("apple", 2))
        )
        totals = [(i.line_total.units, i.line_total.nanos) for i in new[0].order_created.items]
        assert totals == [(7, 500_000_000), (20, 0)], "new events carry it as recorded"

        restocked = await clients.restock("plum", 1)
        assert (restocked[0].stream_version, restocked[0].position) == (4, EVENTS + 7)
        assert restocked[0].product_restocked.available_after == 1
