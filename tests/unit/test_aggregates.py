"""The business rules, on aggregates alone (no store, no gRPC)."""

from __future__ import annotations

import pytest

from domain.aggregates import Order, Product
from domain.errors import (
    InsufficientInventoryError,
    OrderAlreadyCancelledError,
    PermissionDeniedError,
    ProductNotFoundError,
    Shortage,
)
from domain.events import (
    MoneyAmount,
    OrderCancelled,
    OrderCreated,
    ShippingAddress,
    StockReleased,
    StockReserved,
)
from domain.mapper import decode, to_new_event
from domain.values import Address, Money, OrderItem

ADDRESS = Address(recipient="Ada", line1="1 Road", city="London", country_code="GB")


def product(product_id: str, stock: int) -> Product:
    aggregate = Product(product_id)
    if stock:
        aggregate.restock(stock)
        aggregate.mark_committed()
    return aggregate


def line(product_id: str, quantity: int, units: int = 2, nanos: int = 0) -> OrderItem:
    return OrderItem(
        product_id=product_id,
        quantity=quantity,
        unit_price=Money(currency_code="EUR", units=units, nanos=nanos),
    )


def place(items: list[OrderItem], products: dict[str, Product], by: str = "alice") -> Order:
    return Order.place("o-1", "c-1", items, ADDRESS, by, products)


def test_restock_creates_the_product_and_adds_stock() -> None:
    sku = Product("sku")
    assert not sku.exists
    sku.restock(5)
    sku.restock(3)
    assert sku.exists
    assert sku.available == 8
    assert [e.available_after for e in sku.pending] == [5, 8]


def test_placing_an_order_reserves_each_item_and_totals_the_price() -> None:
    products = {"a": product("a", 10), "b": product("b", 1)}
    order = place([line("a", 3, units=1, nanos=500_000_000), line("b", 1, units=4)], products)

    created = order.pending[0]
    assert isinstance(created, OrderCreated)
    assert created.total == MoneyAmount(currency_code="EUR", units=8, nanos=500_000_000)
    assert created.created_by == "alice"
    assert products["a"].available == 7 and products["b"].available == 0
    reserved = [p.pending[0] for p in products.values()]
    assert reserved == [
        StockReserved(product_id="a", order_id="o-1", quantity=3, available_after=7),
        StockReserved(product_id="b", order_id="o-1", quantity=1, available_after=0),
    ]


def test_an_unknown_product_is_not_found_before_stock_is_checked() -> None:
    products = {"a": product("a", 0), "b": product("b", 0)}
    with pytest.raises(ProductNotFoundError) as raised:
        place([line("a", 1), line("b", 1)], products)
    assert raised.value.product_id == "a"


def test_insufficient_stock_lists_every_short_product_and_changes_nothing() -> None:
    products = {"a": product("a", 2), "b": product("b", 5), "c": product("c", 0)}
    products["c"].restock(1)
    products["c"].mark_committed()
    with pytest.raises(InsufficientInventoryError) as raised:
        place([line("a", 3), line("b", 5), line("c", 2)], products)
    assert raised.value.shortages == [Shortage("a", 3, 2), Shortage("c", 2, 1)]
    assert all(not p.pending for p in products.values())
    assert products["a"].available == 2


def test_cancel_releases_every_item_once() -> None:
    products = {"a": product("a", 5)}
    order = place([line("a", 2)], products)
    order.mark_committed()
    products["a"].mark_committed()

    order.cancel("changed my mind", "alice", False, products)
    assert order.pending == [
        OrderCancelled(order_id="o-1", reason="changed my mind", cancelled_by="alice")
    ]
    assert products["a"].pending == [
        StockReleased(product_id="a", order_id="o-1", quantity=2, available_after=5)
    ]
    with pytest.raises(OrderAlreadyCancelledError):
        order.cancel("again", "alice", False, products)


def test_only_the_creator_or_an_admin_may_cancel() -> None:
    products = {"a": product("a", 5)}
    order = place([line("a", 1)], products, by="alice")
    with pytest.raises(PermissionDeniedError):
        order.cancel("", "mallory", False, products)
    order.cancel("", "root", True, products)
    assert order.cancelled


def test_permission_is_checked_before_the_already_cancelled_rule() -> None:
    products = {"a": product("a", 5)}
    order = place([line("a", 1)], products, by="alice")
    order.cancel("", "alice", False, products)
    with pytest.raises(PermissionDeniedError):
        order.cancel("", "mallory", False, products)


def test_replay_rebuilds_the_same_state_as_recording() -> None:
    products = {"a": product("a", 5)}
    order = place([line("a", 2)], products)
    order.cancel("", "alice", False, products)
    rebuilt = Order("o-1")
    rebuilt.replay(order.pending)
    assert (rebuilt.version, rebuilt.cancelled, rebuilt.items) == (2, True, order.items)


def test_stored_events_stay_readable_when_request_rules_are_stricter() -> None:
    long_city = "x" * 500
    written = OrderCreated(
        order_id="o-1",
        customer_id="not even a uuid",
        items=(),
        shipping_address=ShippingAddress(
            recipient="", line1="", city=long_city, country_code="gbr"
        ),
        total=MoneyAmount(currency_code="EUR", units=10**15),
    )
    stored = to_new_event(written, "e-1", "order-o-1", 1)
    read = decode(stored.event_type, stored.schema_version, stored.data)
    assert read == written
    assert isinstance(read, OrderCreated) and read.shipping_address.city == long_city


def test_clone_is_independent_of_its_original() -> None:
    original = product("a", 5)
    twin = original.clone()
    twin.reserve("o", 5)
    assert (original.available, original.pending) == (5, [])
    assert twin.available == 0
