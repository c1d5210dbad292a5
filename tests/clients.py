"""Client-side helpers for end-to-end tests: stubs, request builders, error details."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from google.type import money_pb2
from orders.v1 import (
    event_stream_service_pb2_grpc,
    events_pb2,
    inventory_command_service_pb2,
    inventory_command_service_pb2_grpc,
    order_command_service_pb2,
    order_command_service_pb2_grpc,
    types_pb2,
)


@dataclass
class Clients:
    channel: grpc.aio.Channel
    orders: order_command_service_pb2_grpc.OrderCommandServiceAsyncStub
    inventory: inventory_command_service_pb2_grpc.InventoryCommandServiceAsyncStub
    events: event_stream_service_pb2_grpc.EventStreamServiceAsyncStub

    async def restock(
        self, product_id: str, quantity: int, command_id: str = "", metadata: Any = None
    ) -> list[events_pb2.Event]:
        request = inventory_command_service_pb2.RestockProductRequest(
            command_id=command_id, product_id=product_id, quantity=quantity
        )
        return [r.event async for r in self.inventory.RestockProduct(request, metadata=metadata)]

    async def create(
        self, request: order_command_service_pb2.CreateOrderRequest, metadata: Any = None
    ) -> list[events_pb2.Event]:
        return [r.event async for r in self.orders.CreateOrder(request, metadata=metadata)]

    async def cancel(
        self, order_id: str, reason: str = "", command_id: str = "", metadata: Any = None
    ) -> list[events_pb2.Event]:
        request = order_command_service_pb2.CancelOrderRequest(
            command_id=command_id, order_id=order_id, reason=reason
        )
        return [r.event async for r in self.orders.CancelOrder(request, metadata=metadata)]


def money(units: int = 10, nanos: int = 0, currency: str = "EUR") -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency, units=units, nanos=nanos)


def item(
    product_id: str, quantity: int = 1, price: money_pb2.Money | None = None
) -> types_pb2.OrderItem:
    return types_pb2.OrderItem(
        product_id=product_id, quantity=quantity, unit_price=price or money()
    )


def address(**overrides: str) -> types_pb2.Address:
    fields = {
        "recipient": "Ada Lovelace",
        "line1": "1 Analytical St",
        "city": "London",
        "country_code": "GB",
    }
    fields.update(overrides)
    return types_pb2.Address(**fields)


def order_request(
    *items: types_pb2.OrderItem, command_id: str = "", customer_id: str | None = None
) -> order_command_service_pb2.CreateOrderRequest:
    return order_command_service_pb2.CreateOrderRequest(
        command_id=command_id,
        customer_id=customer_id or str(uuid.uuid4()),
        items=list(items),
        shipping_address=address(),
    )


def status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status carried in grpc-status-details-bin."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    raise AssertionError(f"no rich status details on {error.code()}: {error.details()}")


def detail(error: grpc.aio.AioRpcError, kind: type[Any]) -> Any:
    """The first detail of the given message type, e.g. error_details_pb2.ErrorInfo."""
    for packed in status_of(error).details:
        message = kind()
        if packed.Unpack(message):
            return message
    raise AssertionError(f"no {kind.__name__} in the error details")


def bad_fields(error: grpc.aio.AioRpcError) -> list[str]:
    return [field for field, _ in field_violations(error)]


def field_violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """``(field path, description)`` of each violation in the error's BadRequest."""
    violations = detail(error, error_details_pb2.BadRequest).field_violations
    return [(v.field, v.description) for v in violations]
