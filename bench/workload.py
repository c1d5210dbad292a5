"""What the load consists of: the products, the requests, and the floor's canned answers.

Orders have one item, so CreateOrder commits two events (OrderCreated, StockReserved)
and CancelOrder two (OrderCancelled, StockReleased). Items are spread over many products,
restocked up front with more stock than a run can use, so no call fails for lack of stock
and commands rarely queue on one product's stream lock. The ``hot`` workload is
``create`` with every order on one product (a flash sale): every command then appends
to that product's stream; ``hot-set`` spreads the orders over a few dozen products, all
written at once (a sale of a whole range). The ``keyed`` workload is ``create`` with a client-chosen
``command_id`` on every order, as a client that may retry sends it, and ``jwt`` is
``create`` with a bearer JWT on every call, against a gateway that verifies them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import uuid

from google.type import money_pb2
from orders.v1 import events_pb2, order_command_service_pb2, types_pb2

from domain.fingerprints import FINGERPRINT_PREFIX
from domain.ports import Commit, NewEvent

PRODUCT_COUNT = 1000
RESTOCK_QUANTITY = 1_000_000
"""Per product: at one unit per order, far more than any run places."""

WORKLOADS = ("create", "hot", "hot-set", "keyed", "jwt", "cancel", "mixed")
HOT_PRODUCT = 0
"""The product every ``hot`` order is for."""
HOT_SET = 24
"""The products ``hot-set`` orders are for: the first ones, more than a PostgreSQL
replica's default pool has connections."""


def product_id(n: int) -> str:
    # Fixed width, so every request and event has the same size whatever the product.
    return f"bench-{n:04d}"


def product_ids() -> list[str]:
    return [product_id(n) for n in range(PRODUCT_COUNT)]


def _price() -> money_pb2.Money:
    return money_pb2.Money(currency_code="EUR", units=10)


def _address() -> types_pb2.Address:
    return types_pb2.Address(
        recipient="Ada Lovelace", line1="1 Analytical St", city="London", country_code="GB"
    )


def order_input(product: str, customer_id: str) -> dict[str, object]:
    """The order ``create_request`` sends, as the command input of the in-process paths."""
    return {
        "command_id": "",
        "customer_id": customer_id,
        "items": [
            {
                "product_id": product,
                "quantity": 1,
                "unit_price": {"currency_code": "EUR", "units": 10, "nanos": 0},
            }
        ],
        "shipping_address": {
            "recipient": "Ada Lovelace",
            "line1": "1 Analytical St",
            "line2": "",
            "city": "London",
            "region": "",
            "postal_code": "",
            "country_code": "GB",
        },
    }


def create_request(
    rng: random.Random, customer_id: str, products: int = PRODUCT_COUNT, keyed: bool = False
) -> order_command_service_pb2.CreateOrderRequest:
    """One order of one unit of a random one of the first ``products`` (1: the hot one);
    with a new ``command_id`` if ``keyed``, else the server picks it."""
    return order_command_service_pb2.CreateOrderRequest(
        command_id=str(uuid.uuid4()) if keyed else "",
        customer_id=customer_id,
        items=[
            types_pb2.OrderItem(
                product_id=product_id(HOT_PRODUCT if products == 1 else rng.randrange(products)),
                quantity=1,
                unit_price=_price(),
            )
        ],
        shipping_address=_address(),
    )


def cancel_request(order_id: str) -> order_command_service_pb2.CancelOrderRequest:
    return order_command_service_pb2.CancelOrderRequest(order_id=order_id, reason="bench")


def _envelope(stream_id: str, version: int, position: int, event_type: str) -> events_pb2.Event:
    command_id = str(uuid.uuid4())
    event = events_pb2.Event(
        event_id=str(uuid.uuid4()),
        stream_id=stream_id,
        stream_version=version,
        position=position,
        command_id=command_id,
        correlation_id=command_id,
        event_type=event_type,
    )
    event.occurred_at.FromDatetime(dt.datetime.now(dt.UTC))
    return event


def sample_create_events(position: int = 2_000_001) -> list[events_pb2.Event]:
    """Events shaped and sized like the gateway's answer to ``create_request``.

    Positions and versions are in the millions, as after a long run, so that their
    varints are no shorter than the gateway's: the floor must not be flattered.
    """
    order_id = str(uuid.uuid4())
    product = product_id(PRODUCT_COUNT - 1)
    created = _envelope(f"order-{order_id}", 1, position, "OrderCreated")
    payload = created.order_created
    payload.order_id = order_id
    payload.customer_id = str(uuid.uuid4())
    payload.items.append(types_pb2.OrderItem(product_id=product, quantity=1, unit_price=_price()))
    payload.shipping_address.CopyFrom(_address())
    payload.total.CopyFrom(_price())
    reserved = _envelope(f"product-{product}", 2_000, position + 1, "StockReserved")
    reserved.stock_reserved.CopyFrom(
        events_pb2.StockReserved(
            product_id=product, order_id=order_id, quantity=1, available_after=RESTOCK_QUANTITY - 1
        )
    )
    return [created, reserved]


def sample_cancel_events(position: int = 2_000_001) -> list[events_pb2.Event]:
    """Events shaped and sized like the gateway's answer to ``cancel_request``."""
    order_id = str(uuid.uuid4())
    product = product_id(PRODUCT_COUNT - 1)
    cancelled = _envelope(f"order-{order_id}", 2, position, "OrderCancelled")
    cancelled.order_cancelled.CopyFrom(
        events_pb2.OrderCancelled(order_id=order_id, reason="bench", cancelled_by="")
    )
    released = _envelope(f"product-{product}", 2_001, position + 1, "StockReleased")
    released.stock_released.CopyFrom(
        events_pb2.StockReleased(
            product_id=product, order_id=order_id, quantity=1, available_after=RESTOCK_QUANTITY
        )
    )
    return [cancelled, released]


def raw_commit(expected_versions: dict[str, int], events: list[NewEvent]) -> Commit:
    """A commit of ready-made events for filling a store straight through its port
    (no command behind it: a fresh id, no caller, a fingerprint of the shape verify
    checks)."""
    command_id = str(uuid.uuid4())
    return Commit(
        command_id=command_id,
        fingerprint=FINGERPRINT_PREFIX + hashlib.sha256(command_id.encode()).hexdigest(),
        correlation_id=command_id,
        user_id="",
        occurred_at=dt.datetime.now(dt.UTC),
        expected_versions=expected_versions,
        events=events,
    )
