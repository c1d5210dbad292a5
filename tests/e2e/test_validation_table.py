"""Every validation rule of the API (docs/api.md), one row each, over a real server.

Each rejected row names exactly the fields that ``google.rpc.BadRequest`` must report (all
at once, by proto path) and the description a client reads for each, in our own words;
each accepted row is a boundary a correct caller may use.
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

from tests.clients import Clients, address, field_violations, item, money

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


def too_many_items_some_wrong() -> order_command_service_pb2.CreateOrderRequest:
    """101 items, three of them wrong: the length does not hide the items' violations."""
    request = many_items(101)
    request.items[0].quantity = 0
    request.items[50].unit_price.currency_code = "eur"
    request.items[100].product_id = "sku 100"
    return request


def too_many_items_one_malformed_id_twice() -> order_command_service_pb2.CreateOrderRequest:
    """101 items, two with the same malformed product id: malformed, not duplicates."""
    request = many_items(101)
    request.items[1].product_id = "bad id"
    request.items[2].product_id = "bad id"
    return request


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
    violations: dict[str, str]
    """Field path → the description the client reads."""


A_UUID = "must be a UUID in the 36-character hyphenated form"
A_PRODUCT_ID = "must be 1 to 64 characters of A-Z a-z 0-9 . _ -"
A_CURRENCY = "must be an ISO 4217 code (3 capital letters)"
A_COUNTRY = "must be an ISO 3166-1 code (2 capital letters)"
REQUIRED = "is required"
NOT_BLANK = "is required and must not be blank"
AT_LEAST_0 = "must be at least 0"
AT_LEAST_1 = "must be at least 1"
AT_LEAST_1_ITEM = "must hold at least 1 item"
AT_MOST_100_ITEMS = "must hold at most 100 items"
AT_MOST_200_CHARACTERS = "must be at most 200 characters"
PRODUCT_TWICE = "product appears more than once in the order"
ONE_CURRENCY_EUR = "all items must be priced in one currency (EUR)"


UPPER_UUID = UUID.upper()
ROWS: dict[str, Row] = {
    # command_id: empty or a UUID (36-character hyphenated form).
    "command_id not a uuid": Row(create_order(command_id="order-1"), {"command_id": A_UUID}),
    "command_id blank": Row(create_order(command_id=" "), {"command_id": A_UUID}),
    "command_id unhyphenated": Row(
        create_order(command_id=uuid.uuid4().hex), {"command_id": A_UUID}
    ),
    "command_id braces": Row(create_order(command_id="{" + UUID + "}"), {"command_id": A_UUID}),
    "command_id urn": Row(create_order(command_id=f"urn:uuid:{UUID}"), {"command_id": A_UUID}),
    "command_id trailing newline": Row(
        create_order(command_id=UUID + "\n"), {"command_id": A_UUID}
    ),
    "cancel command_id": Row(cancel_order(command_id="x"), {"command_id": A_UUID}),
    "restock command_id": Row(restock(command_id=UUID[:-1]), {"command_id": A_UUID}),
    # customer_id, order_id: a UUID.
    "customer_id missing": Row(create_order(customer_id=""), {"customer_id": A_UUID}),
    "customer_id unhyphenated": Row(
        create_order(customer_id=UUID.replace("-", "")), {"customer_id": A_UUID}
    ),
    "customer_id not hex": Row(create_order(customer_id="g" + UUID[1:]), {"customer_id": A_UUID}),
    "customer_id fullwidth digit": Row(
        create_order(customer_id="\uff10" + UUID[1:]), {"customer_id": A_UUID}
    ),
    "customer_id padded": Row(create_order(customer_id=f" {UUID} "), {"customer_id": A_UUID}),
    "order_id missing": Row(cancel_order(order_id=""), {"order_id": A_UUID}),
    "order_id unhyphenated": Row(
        cancel_order(order_id=UUID.replace("-", "")), {"order_id": A_UUID}
    ),
    # items: 1 to 100.
    "no items": Row(create_order(items=[]), {"items": AT_LEAST_1_ITEM}),
    "101 items": Row(many_items(101), {"items": AT_MOST_100_ITEMS}),
    "101 items, some wrong": Row(
        too_many_items_some_wrong(),
        {
            "items": AT_MOST_100_ITEMS,
            "items[0].quantity": AT_LEAST_1,
            "items[50].unit_price.currency_code": A_CURRENCY,
            "items[100].product_id": A_PRODUCT_ID,
        },
    ),
    "101 items, a malformed product id twice": Row(
        too_many_items_one_malformed_id_twice(),
        {
            "items": AT_MOST_100_ITEMS,
            "items[1].product_id": A_PRODUCT_ID,
            "items[2].product_id": A_PRODUCT_ID,
        },
    ),
    # No product twice: the later one's product_id.
    "duplicate product": Row(
        create_order(items=[item("a"), item("b"), item("a")]),
        {"items[2].product_id": PRODUCT_TWICE},
    ),
    "two items, one product": Row(
        create_order(items=[item("a"), item("a")]),
        {"items[1].product_id": PRODUCT_TWICE},
    ),
    "product thrice": Row(
        create_order(items=[item("a"), item("a"), item("a")]),
        {"items[1].product_id": PRODUCT_TWICE, "items[2].product_id": PRODUCT_TWICE},
    ),
    # product_id: 1 to 64 characters of A-Z a-z 0-9 . _ -
    "product_id missing": Row(with_item(0, product_id=""), {"items[0].product_id": A_PRODUCT_ID}),
    "product_id 65 chars": Row(
        with_item(1, product_id="p" * 65), {"items[1].product_id": A_PRODUCT_ID}
    ),
    "product_id space": Row(
        with_item(0, product_id="sku 1"), {"items[0].product_id": A_PRODUCT_ID}
    ),
    "product_id slash": Row(
        with_item(0, product_id="sku/1"), {"items[0].product_id": A_PRODUCT_ID}
    ),
    "product_id non-ascii": Row(
        with_item(0, product_id="skü"), {"items[0].product_id": A_PRODUCT_ID}
    ),
    "product_id newline": Row(
        with_item(0, product_id="sku\n"), {"items[0].product_id": A_PRODUCT_ID}
    ),
    "restock product_id missing": Row(restock(product_id=""), {"product_id": A_PRODUCT_ID}),
    "restock product_id 65 chars": Row(restock(product_id="p" * 65), {"product_id": A_PRODUCT_ID}),
    "restock product_id charset": Row(restock(product_id="sku*"), {"product_id": A_PRODUCT_ID}),
    # quantity: 1 to 10,000.
    "quantity 0": Row(with_item(2, quantity=0), {"items[2].quantity": AT_LEAST_1}),
    "quantity negative": Row(with_item(2, quantity=-1), {"items[2].quantity": AT_LEAST_1}),
    "quantity 10001": Row(
        with_item(2, quantity=10_001), {"items[2].quantity": "must be at most 10,000"}
    ),
    "quantity int32 min": Row(with_item(0, quantity=-(2**31)), {"items[0].quantity": AT_LEAST_1}),
    # unit_price: present, ISO 4217 code, one currency, units and nanos in range.
    "unit_price missing": Row(with_item(1, unit_price=None), {"items[1].unit_price": REQUIRED}),
    "currency lower case": Row(
        with_item(0, currency_code="eur"), {"items[0].unit_price.currency_code": A_CURRENCY}
    ),
    "currency blank": Row(
        with_item(0, currency_code=""), {"items[0].unit_price.currency_code": A_CURRENCY}
    ),
    "currency 4 letters": Row(
        with_item(0, currency_code="EURO"), {"items[0].unit_price.currency_code": A_CURRENCY}
    ),
    "currency digit": Row(
        with_item(0, currency_code="E1R"), {"items[0].unit_price.currency_code": A_CURRENCY}
    ),
    "mixed currency": Row(
        priced("EUR", "EUR", "USD"), {"items[2].unit_price.currency_code": ONE_CURRENCY_EUR}
    ),
    "two items, two currencies": Row(
        priced("EUR", "USD"), {"items[1].unit_price.currency_code": ONE_CURRENCY_EUR}
    ),
    "mixed currency, first difference only": Row(
        priced("EUR", "USD", "GBP"), {"items[1].unit_price.currency_code": ONE_CURRENCY_EUR}
    ),
    "malformed currency does not set the order's": Row(
        priced("", "EUR"), {"items[0].unit_price.currency_code": A_CURRENCY}
    ),
    "malformed currency does not hide a mismatch": Row(
        priced("EUR", "eur", "USD"),
        {
            "items[1].unit_price.currency_code": A_CURRENCY,
            "items[2].unit_price.currency_code": ONE_CURRENCY_EUR,
        },
    ),
    "units negative": Row(with_item(0, units=-1), {"items[0].unit_price.units": AT_LEAST_0}),
    "units over a billion": Row(
        with_item(0, units=1_000_000_001),
        {"items[0].unit_price.units": "must be at most 1,000,000,000"},
    ),
    "nanos negative": Row(with_item(0, nanos=-1), {"items[0].unit_price.nanos": AT_LEAST_0}),
    "units and nanos both out of range": Row(
        with_item(1, units=10**12, nanos=-5),
        {
            "items[1].unit_price.nanos": AT_LEAST_0,
            "items[1].unit_price.units": "must be at most 1,000,000,000",
        },
    ),
    "nanos a full unit": Row(
        with_item(0, nanos=1_000_000_000),
        {"items[0].unit_price.nanos": "must be at most 999,999,999"},
    ),
    # shipping_address: present; recipient, line1, city, country_code required.
    "address missing": Row(
        create_order(shipping_address=NO_ADDRESS), {"shipping_address": REQUIRED}
    ),
    "recipient missing": Row(shipped(recipient=""), {"shipping_address.recipient": NOT_BLANK}),
    "recipient blank": Row(shipped(recipient=" \t\n"), {"shipping_address.recipient": NOT_BLANK}),
    "recipient invisible": Row(
        shipped(recipient="\u200b\ufeff\u2060\x00"), {"shipping_address.recipient": NOT_BLANK}
    ),
    "line1 missing": Row(shipped(line1=""), {"shipping_address.line1": NOT_BLANK}),
    "city blank": Row(shipped(city="   "), {"shipping_address.city": NOT_BLANK}),
    "country_code missing": Row(
        shipped(country_code=""), {"shipping_address.country_code": A_COUNTRY}
    ),
    "country_code lower case": Row(
        shipped(country_code="gb"), {"shipping_address.country_code": A_COUNTRY}
    ),
    "country_code 3 letters": Row(
        shipped(country_code="GBR"), {"shipping_address.country_code": A_COUNTRY}
    ),
    # No address field over 200 characters (characters, not bytes).
    **{
        f"{name} 201 chars": Row(
            shipped(**{name: "ü" * 201}), {f"shipping_address.{name}": AT_MOST_200_CHARACTERS}
        )
        for name in ("recipient", "line1", "line2", "city", "region", "postal_code")
    },
    # reason: at most 500 characters.
    "reason 501 chars": Row(
        cancel_order(reason="r" * 501), {"reason": "must be at most 500 characters"}
    ),
    # RestockProduct quantity: 1 to 1,000,000.
    "restock quantity 0": Row(restock(quantity=0), {"quantity": AT_LEAST_1}),
    "restock quantity negative": Row(restock(quantity=-5), {"quantity": AT_LEAST_1}),
    "restock quantity 1,000,001": Row(
        restock(quantity=1_000_001), {"quantity": "must be at most 1,000,000"}
    ),
    # All violations at once.
    "everything wrong": Row(
        everything_wrong(),
        {
            "command_id": A_UUID,
            "customer_id": A_UUID,
            "items[0].unit_price.currency_code": A_CURRENCY,
            "items[1].product_id": PRODUCT_TWICE,
            "items[2].quantity": AT_LEAST_1,
            "shipping_address.city": NOT_BLANK,
            "shipping_address.country_code": A_COUNTRY,
        },
    ),
    "cancel everything wrong": Row(
        cancel_order(command_id="1", order_id="2", reason="r" * 600),
        {"command_id": A_UUID, "order_id": A_UUID, "reason": "must be at most 500 characters"},
    ),
    "restock everything wrong": Row(
        restock(command_id="1", product_id="", quantity=0),
        {"command_id": A_UUID, "product_id": A_PRODUCT_ID, "quantity": AT_LEAST_1},
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
async def test_each_violation_is_reported_at_its_exact_path_in_our_words(
    clients: Clients, row: Row
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await caller_for(clients, row.request)()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(caught.value)
    assert sorted(violations) == sorted(row.violations.items())
    assert caught.value.details() == "invalid request: " + ", ".join(f for f, _ in violations)


async def test_an_order_with_hundreds_of_violations_still_reaches_the_client_as_such(
    clients: Clients,
) -> None:
    # 100 items wrong in five fields each: 501 violations, far more than gRPC clients
    # accept in trailing metadata by default (8 KiB; beyond 16 KiB they see
    # RESOURCE_EXHAUSTED, not the error). The first are reported, the message counts the rest.
    items = [
        item(f"no such id {n}!", quantity=0, price=money(units=-1, nanos=-1, currency="eur"))
        for n in range(100)
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await clients.create(create_order(customer_id="nope", items=items))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reported = [field for field, _ in field_violations(caught.value)]
    assert reported[:3] == ["customer_id", "items[0].product_id", "items[0].quantity"]
    assert 10 <= len(reported) < 501
    assert caught.value.details() == (
        f"invalid request: {', '.join(reported)} and {501 - len(reported)} more"
    )


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
