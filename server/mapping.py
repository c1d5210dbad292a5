"""Proto ⇄ domain mapping: request messages to command input, recorded events to ``Event``.

Requests become plain dicts that the pydantic command validates, so validation lives in
one place (``domain.commands``). An absent message field is left out of the dict, which
pydantic reports as a missing field at that path.
"""

from __future__ import annotations

from typing import Any

from google.type import money_pb2
from orders.v1 import events_pb2, types_pb2
from orders.v1.inventory_command_service_pb2 import RestockProductRequest
from orders.v1.order_command_service_pb2 import CancelOrderRequest, CreateOrderRequest

from domain import events as domain_events
from domain.mapper import to_domain_event
from domain.ports import RecordedEvent
from domain.values import Address, Money, OrderItem


def create_order_input(request: CreateOrderRequest) -> dict[str, Any]:
    data: dict[str, Any] = {
        "command_id": request.command_id,
        "customer_id": request.customer_id,
        "items": [_item_input(item) for item in request.items],
    }
    if request.HasField("shipping_address"):
        address = request.shipping_address
        data["shipping_address"] = {
            "recipient": address.recipient,
            "line1": address.line1,
            "line2": address.line2,
            "city": address.city,
            "region": address.region,
            "postal_code": address.postal_code,
            "country_code": address.country_code,
        }
    return data


def _item_input(item: types_pb2.OrderItem) -> dict[str, Any]:
    data: dict[str, Any] = {"product_id": item.product_id, "quantity": item.quantity}
    if item.HasField("unit_price"):
        data["unit_price"] = {
            "currency_code": item.unit_price.currency_code,
            "units": item.unit_price.units,
            "nanos": item.unit_price.nanos,
        }
    return data


def cancel_order_input(request: CancelOrderRequest) -> dict[str, Any]:
    return {
        "command_id": request.command_id,
        "order_id": request.order_id,
        "reason": request.reason,
    }


def restock_product_input(request: RestockProductRequest) -> dict[str, Any]:
    return {
        "command_id": request.command_id,
        "product_id": request.product_id,
        "quantity": request.quantity,
    }


def to_proto_event(record: RecordedEvent) -> events_pb2.Event:
    event = events_pb2.Event(
        event_id=record.event_id,
        stream_id=record.stream_id,
        stream_version=record.stream_version,
        position=record.position,
        command_id=record.command_id,
        correlation_id=record.correlation_id,
        user_id=record.user_id,
        event_type=record.event_type,
    )
    event.occurred_at.FromDatetime(record.occurred_at)
    _fill_payload(event, to_domain_event(record))
    return event


def _fill_payload(event: events_pb2.Event, payload: domain_events.DomainEvent) -> None:
    match payload:
        case domain_events.OrderCreated():
            created = event.order_created
            created.order_id = payload.order_id
            created.customer_id = payload.customer_id
            created.items.extend(_proto_item(item) for item in payload.items)
            created.shipping_address.CopyFrom(_proto_address(payload.shipping_address))
            created.total.CopyFrom(_proto_money(payload.total))
        case domain_events.OrderCancelled():
            event.order_cancelled.order_id = payload.order_id
            event.order_cancelled.reason = payload.reason
            event.order_cancelled.cancelled_by = payload.cancelled_by
        case domain_events.StockReserved():
            event.stock_reserved.CopyFrom(
                events_pb2.StockReserved(
                    product_id=payload.product_id,
                    order_id=payload.order_id,
                    quantity=payload.quantity,
                    available_after=payload.available_after,
                )
            )
        case domain_events.StockReleased():
            event.stock_released.CopyFrom(
                events_pb2.StockReleased(
                    product_id=payload.product_id,
                    order_id=payload.order_id,
                    quantity=payload.quantity,
                    available_after=payload.available_after,
                )
            )
        case domain_events.ProductRestocked():
            event.product_restocked.CopyFrom(
                events_pb2.ProductRestocked(
                    product_id=payload.product_id,
                    quantity=payload.quantity,
                    available_after=payload.available_after,
                )
            )
        case _:
            raise TypeError(f"no proto payload for {payload.event_type}")


def _proto_money(money: Money) -> money_pb2.Money:
    return money_pb2.Money(currency_code=money.currency_code, units=money.units, nanos=money.nanos)


def _proto_item(item: OrderItem) -> types_pb2.OrderItem:
    return types_pb2.OrderItem(
        product_id=item.product_id,
        quantity=item.quantity,
        unit_price=_proto_money(item.unit_price),
    )


def _proto_address(address: Address) -> types_pb2.Address:
    return types_pb2.Address(
        recipient=address.recipient,
        line1=address.line1,
        line2=address.line2,
        city=address.city,
        region=address.region,
        postal_code=address.postal_code,
        country_code=address.country_code,
    )
