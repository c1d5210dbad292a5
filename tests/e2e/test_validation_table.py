"""Every validation rule of the contract, one row each, over a real server.

Each rejected row names exactly the fields that ``google.rpc.BadRequest`` must report
(all at once, by proto path); each accepted row is a boundary a correct caller may use.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from orders.v1 import inventory_command_service_pb2, order_command_service_pb2, types_pb2

from tests.clients import Clients, address, bad_fields, item, money

UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"


NO_ADDRESS = types_pb2.Address()


def create_order(
    command_id: str = "",
    customer_id: str = UUID,
    items: list[types_pb2.OrderItem] | None = None,
    shipping_address: types_pb2.Address | None = None,
) -> order_command_service_pb2.CreateOrderRequest:
    """A valid request but for what is given (``NO_ADDRESS``: leave the address out)."""
    request = order_command_service_pb2.CreateOrderRequest(
        command_id=command_id,
        customer_id=customer_id,
        items=[item("sku-1"), item("sku-2"), item("sku-3")] if items is None else items,
    )
    if shipping_address is not NO_ADDRESS:
        request.shipping_address.CopyFrom(shipping_address or address())
    return request


def with_item(index: int, **changes: Any) -> order_command_service_pb2.CreateOrderRequest:
    request = create_order()
    target = request.items[index]
    for name, value in changes.items():
        if name == "unit_price" and value is None:
            target.ClearField("unit_price")
        elif name == "unit_price":
            target.unit_price.CopyFrom(value)
        elif name in ("currency_code", "units", "nanos"):
            setattr(target.unit_price, name, value)
        else:
            setattr(target, name, value)
    return request


def priced(*currencies: str) -> order_command_service_pb2.CreateOrderRequest:
    return create_order(
        items=[item(f"sku-{n}", price=money(currency=c)) for n, c in enumerate(currencies)]
    )


def shipped(**fields: str) -> order_command_service_pb2.CreateOrderRequest:
    return create_order(shipping_address=address(**fields))


def cancel_order(**changes: Any) -> order_command_service_pb2.CancelOrderRequest:
    fields = {"command_id": "", "order_id": UUID, "reason": ""}
    fields.update(changes)
    return order_command_service_pb2.CancelOrderRequest(**fields)


def restock(**changes: Any) -> inventory_command_service_pb2.RestockProductRequest:
    fields: dict[str, Any] = {"command_id": "", "product_id": "sku-1", "quantity": 1}
    fields.update(changes)
    return inventory_command_service_pb2.RestockProductRequest(**fields)


def many_items(count: int) -> order_command_service_pb2.CreateOrderRequest:
    return create_order(items=[item(f"sku-{n}") for n in range(count)])


def everything_wrong() -> order_command_service_pb2.CreateOrderRequest:
    request = create_order(command_id="42", customer_id="nobody")
    request.items[2].quantity = 0
    request.items[0].unit_price.currency_code = "euro"
    request.items[1].product_id = "sku-1"
    request.shipping_address.city = " "
    request.shipping_address.country_code = "gbr"
    return request


@dataclass(frozen=True)
class Row:
    request: Message
    fields: list[str]


UPPER_UUID = UUID.upper()
ROWS: dict[str, Row] = {
    # command_id: empty or a UUID (36-character hyphenated form).
    "command_id not a uuid": Row(create_order(command_id="order-1"), ["command_id"]),
    "command_id blank": Row(create_order(command_id=" "), ["command_id"]),
    "command_id unhyphenated": Row(create_order(command_id=uuid.uuid4().hex), ["command_id"]),
    "command_id braces": Row(create_order(command_id="{" + UUID + "}"), ["command_id"]),
    "command_id urn": Row(create_order(command_id=f"urn:uuid:{UUID}"), ["command_id"]),
    "command_id trailing newline": Row(create_order(command_id=UUID + "\n"), ["command_id"]),
    "cancel command_id": Row(cancel_order(command_id="x"), ["command_id"]),
    "restock command_id": Row(restock(command_id=UUID[:-1]), ["command_id"]),
    # customer_id, order_id: a UUID.
    "customer_id missing": Row(create_order(customer_id=""), ["customer_id"]),
    "customer_id unhyphenated": Row(
        create_order(customer_id=UUID.replace("-", "")), ["customer_id"]
    ),
    "customer_id not hex": Row(create_order(customer_id="g" + UUID[1:]), ["customer_id"]),
    "customer_id fullwidth digit": Row(
        create_order(customer_id="\uff10" + UUID[1:]), ["customer_id"]
    ),
    "customer_id padded": Row(create_order(customer_id=f" {UUID} "), ["customer_id"]),
    "order_id missing": Row(cancel_order(order_id=""), ["order_id"]),
    "order_id unhyphenated": Row(cancel_order(order_id=UUID.replace("-", "")), ["order_id"]),
    # items: 1 to 100.
    "no items": Row(create_order(items=[]), ["items"]),
    "101 items": Row(many_items(101), ["items"]),
    # No product twice: the later one's product_id.
    "duplicate product": Row(
        create_order(items=[item("a"), item("b"), item("a")]), ["items[2].product_id"]
    ),
    "product thrice": Row(
        create_order(items=[item("a"), item("a"), item("a")]),
        ["items[1].product_id", "items[2].product_id"],
    ),
    # product_id: 1 to 64 characters of A-Z a-z 0-9 . _ -
    "product_id missing": Row(with_item(0, product_id=""), ["items[0].product_id"]),
    "product_id 65 chars": Row(with_item(1, product_id="p" * 65), ["items[1].product_id"]),
    "product_id space": Row(with_item(0, product_id="sku 1"), ["items[0].product_id"]),
    "product_id slash": Row(with_item(0, product_id="sku/1"), ["items[0].product_id"]),
    "product_id non-ascii": Row(with_item(0, product_id="skü"), ["items[0].product_id"]),
    "product_id newline": Row(with_item(0, product_id="sku\n"), ["items[0].product_id"]),
    "restock product_id missing": Row(restock(product_id=""), ["product_id"]),
    "restock product_id 65 chars": Row(restock(product_id="p" * 65), ["product_id"]),
    "restock product_id charset": Row(restock(product_id="sku*"), ["product_id"]),
    # quantity: 1 to 10,000.
    "quantity 0": Row(with_item(2, quantity=0), ["items[2].quantity"]),
    "quantity negative": Row(with_item(2, quantity=-1), ["items[2].quantity"]),
    "quantity 10001": Row(with_item(2, quantity=10_001), ["items[2].quantity"]),
    "quantity int32 min": Row(with_item(0, quantity=-(2**31)), ["items[0].quantity"]),
    # unit_price: present, ISO 4217 code, one currency, units and nanos in range.
    "unit_price missing": Row(with_item(1, unit_price=None), ["items[1].unit_price"]),
    "currency lower case": Row(
        with_item(0, currency_code="eur"), ["items[0].unit_price.currency_code"]
    ),
    "currency blank": Row(with_item(0, currency_code=""), ["items[0].unit_price.currency_code"]),
    "currency 4 letters": Row(
        with_item(0, currency_code="EURO"), ["items[0].unit_price.currency_code"]
    ),
    "currency digit": Row(with_item(0, currency_code="E1R"), ["items[0].unit_price.currency_code"]),
    "mixed currency": Row(priced("EUR", "EUR", "USD"), ["items[2].unit_price.currency_code"]),
    "mixed currency, first difference only": Row(
        priced("EUR", "USD", "GBP"), ["items[1].unit_price.currency_code"]
    ),
    "malformed currency does not set the order's": Row(
        priced("", "EUR"), ["items[0].unit_price.currency_code"]
    ),
    "malformed currency does not hide a mismatch": Row(
        priced("EUR", "eur", "USD"),
        ["items[1].unit_price.currency_code", "items[2].unit_price.currency_code"],
    ),
    "units negative": Row(with_item(0, units=-1), ["items[0].unit_price.units"]),
    "units over a billion": Row(with_item(0, units=1_000_000_001), ["items[0].unit_price.units"]),
    "nanos negative": Row(with_item(0, nanos=-1), ["items[0].unit_price.nanos"]),
    "units and nanos both out of range": Row(
        with_item(1, units=10**12, nanos=-5),
        ["items[1].unit_price.units", "items[1].unit_price.nanos"],
    ),
    "nanos a full unit": Row(with_item(0, nanos=1_000_000_000), ["items[0].unit_price.nanos"]),
    # shipping_address: present; recipient, line1, city, country_code required.
    "address missing": Row(create_order(shipping_address=NO_ADDRESS), ["shipping_address"]),
    "recipient missing": Row(shipped(recipient=""), ["shipping_address.recipient"]),
    "recipient blank": Row(shipped(recipient=" \t\n"), ["shipping_address.recipient"]),
    "line1 missing": Row(shipped(line1=""), ["shipping_address.line1"]),
    "city blank": Row(shipped(city="   "), ["shipping_address.city"]),
    "country_code missing": Row(shipped(country_code=""), ["shipping_address.country_code"]),
    "country_code lower case": Row(shipped(country_code="gb"), ["shipping_address.country_code"]),
    "country_code 3 letters": Row(shipped(country_code="GBR"), ["shipping_address.country_code"]),
    # No address field over 200 characters (characters, not bytes).
    **{
        f"{name} 201 chars": Row(shipped(**{name: "ü" * 201}), [f"shipping_address.{name}"])
        for name in ("recipient", "line1", "line2", "city", "region", "postal_code")
    },
    # reason: at most 500 characters.
    "reason 501 chars": Row(cancel_order(reason="r" * 501), ["reason"]),
    # RestockProduct quantity: 1 to 1,000,000.
    "restock quantity 0": Row(restock(quantity=0), ["quantity"]),
    "restock quantity negative": Row(restock(quantity=-5), ["quantity"]),
    "restock quantity 1,000,001": Row(restock(quantity=1_000_001), ["quantity"]),
    # All violations at once.
    "everything wrong": Row(
        everything_wrong(),
        [
            "command_id",
            "customer_id",
            "items[0].unit_price.currency_code",
            "items[1].product_id",
            "items[2].quantity",
            "shipping_address.city",
            "shipping_address.country_code",
        ],
    ),
    "cancel everything wrong": Row(
        cancel_order(command_id="1", order_id="2", reason="r" * 600),
        ["command_id", "order_id", "reason"],
    ),
    "restock everything wrong": Row(
        restock(command_id="1", product_id="", quantity=0), ["command_id", "product_id", "quantity"]
    ),
}


def caller_for(clients: Clients, request: Message) -> Callable[[], Any]:
    if isinstance(request, order_command_service_pb2.CreateOrderRequest):
        return lambda: clients.create(request)
    if isinstance(request, order_command_service_pb2.CancelOrderRequest):
        return lambda: clients.cancel(request.order_id, request.reason, request.command_id)
    assert isinstance(request, inventory_command_service_pb2.RestockProductRequest)
    return lambda: clients.restock(request.product_id, request.quantity, request.command_id)


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
async def test_each_violation_is_reported_at_its_exact_path(clients: Clients, row: Row) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await caller_for(clients, row.request)()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(bad_fields(caught.value)) == sorted(row.fields)


async def stocked(clients: Clients, *product_ids: str) -> None:
    for product_id in product_ids:
        await clients.restock(product_id, 1_000_000)


async def test_boundary_values_are_accepted(clients: Clients) -> None:
    await stocked(clients, "sku-1", "sku-2", "sku-3", "P" * 64, "a.b_c-D9")
    request = create_order(
        command_id=UPPER_UUID, customer_id="0F8FAD5B-d9cb-469F-a165-70867728950E"
    )
    request.items[0].quantity = 10_000
    request.items[1].product_id = "P" * 64
    request.items[1].unit_price.CopyFrom(money(units=1_000_000_000, nanos=999_999_999))
    request.items[2].product_id = "a.b_c-D9"
    request.items[2].unit_price.CopyFrom(money(units=0, nanos=0))
    # 200 characters each, whatever their size in bytes; optional fields may be empty.
    request.shipping_address.CopyFrom(
        address(recipient="ü" * 200, line1="😀" * 200, city="e\u0301" * 100, line2="")
    )
    created = await clients.create(request)
    assert created[0].event_type == "OrderCreated"
    # UUIDs of any case are accepted and written in lower case.
    assert created[0].command_id == UUID
    assert created[0].order_created.customer_id == UUID
    assert created[0].order_created.shipping_address.line1 == "😀" * 200

    order_id = created[0].order_created.order_id
    cancelled = await clients.cancel(order_id.upper(), reason="r" * 500)
    assert cancelled[0].order_cancelled.order_id == order_id
    assert len(cancelled[0].order_cancelled.reason) == 500


async def test_an_order_of_exactly_100_items_is_accepted(clients: Clients) -> None:
    await stocked(clients, *(f"sku-{n}" for n in range(100)))
    created = await clients.create(many_items(100))
    assert len(created) == 101


@pytest.mark.parametrize("quantity", [1, 1_000_000])
async def test_restock_quantity_bounds_are_accepted(clients: Clients, quantity: int) -> None:
    restocked = await clients.restock("sku-1", quantity)
    assert restocked[0].product_restocked.available_after == quantity
