"""Proto ⇄ domain mapping: request messages to command input, recorded events to ``Event``.

Requests become plain dicts that the pydantic command validates, so validation lives in
one place (``domain.commands``). An absent message field is left out of the dict, which
pydantic reports as a missing field at that path.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, TypeVar

from google.protobuf.message import Message
from orders.v1 import events_pb2, types_pb2
from orders.v1.inventory_command_service_pb2 import RestockProductRequest
from orders.v1.order_command_service_pb2 import CancelOrderRequest, CreateOrderRequest
from pydantic_core import from_json

from domain import events as domain_events
from domain.commands import CHECKED_ITEMS
from domain.mapper import UNDECODABLE, unreadable_event
from domain.ports import RecordedEvent
from server.stores.event_rows import EventRow

R = TypeVar("R", bound=Message)


def create_order_input(request: CreateOrderRequest) -> dict[str, Any]:
    items: Sequence[types_pb2.OrderItem] = request.items
    checked = len(items)
    if checked > CHECKED_ITEMS:
        # The command refuses more than MAX_ITEMS and checks no item past these: a request
        # may carry half a million (empty items take two bytes each).
        checked = CHECKED_ITEMS
    data: dict[str, Any] = {
        "command_id": request.command_id,
        "customer_id": request.customer_id,
        # By index: iterating the repeated field ends with an IndexError raised and
        # caught, about 3,000 instructions per request.
        "items": [_item_input(items[index]) for index in range(checked)],
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
        price = item.unit_price
        data["unit_price"] = {
            "currency_code": price.currency_code,
            "units": price.units,
            "nanos": price.nanos,
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


def event_response(response_type: Callable[..., R], record: RecordedEvent) -> R:
    """``response_type(event=…)`` for a recorded event, built in one step: protobuf
    builds the nested ``Event`` from its fields, with no intermediate message to copy.
    Raises ``UnreadableEventError`` for an event whose payload does not fit its message."""
    event = proto_event_fields(record)
    try:
        return response_type(event=event)
    except UNDECODABLE as error:
        raise unreadable_event(
            record.position, record.stream_id, record.event_type, error
        ) from error


def proto_event_fields(record: RecordedEvent) -> dict[str, Any]:
    """The ``Event`` of a recorded event, as constructor arguments (nested dicts).

    Built straight from the stored JSON: the payload's fields are the proto's (domain
    value objects use the proto field names), so the bytes are parsed once, in Rust, and
    the message is built in one constructor call. Stored events were validated when they
    were recorded; decoding them into pydantic models again only to copy every field
    across cost more than the rest of the mapping. Raises ``UnreadableEventError`` for a
    payload that does not decode (a damaged row), naming the event for the log.
    """
    try:
        field_name, payload = _payload(record.event_type, record.data, record.schema_version)
    except UNDECODABLE as error:
        raise unreadable_event(
            record.position, record.stream_id, record.event_type, error
        ) from error
    return {
        "event_id": record.event_id,
        "stream_id": record.stream_id,
        "stream_version": record.stream_version,
        "position": record.position,
        "occurred_at": _timestamp(record.occurred_at),
        "command_id": record.command_id,
        "correlation_id": record.correlation_id,
        "user_id": record.user_id,
        "event_type": record.event_type,
        field_name: payload,
    }


def row_event_response(response_type: Callable[..., R], row: EventRow) -> R:
    """``event_response`` for a stored row (``server.stores.event_rows``): the same message,
    with no ``RecordedEvent`` or ``datetime`` built on the way."""
    (
        event_id,
        stream_id,
        stream_version,
        position,
        occurred_at_us,
        command_id,
        correlation_id,
        user_id,
        event_type,
        data,
        schema_version,
    ) = row
    # Floor division, as Timestamp wants it: nanos are never negative.
    seconds, micros = divmod(occurred_at_us, 1_000_000)
    try:
        field_name, payload = _payload(event_type, data, schema_version)
        return response_type(
            event={
                "event_id": event_id,
                "stream_id": stream_id,
                "stream_version": stream_version,
                "position": position,
                "occurred_at": {"seconds": seconds, "nanos": micros * 1000},
                "command_id": command_id,
                "correlation_id": correlation_id,
                "user_id": user_id,
                "event_type": event_type,
                field_name: payload,
            }
        )
    except UNDECODABLE as error:
        # As ``event_response``: the log of the subscription that ends on it names it.
        raise unreadable_event(position, stream_id, event_type, error) from error


def _payload(event_type: str, data: bytes, schema_version: int) -> tuple[str, dict[str, Any]]:
    """The ``Event.payload`` field of an event type, and its stored JSON, upcast to the
    current version, as that message's constructor arguments."""
    try:
        field_name, proto_fields = _PAYLOAD_FIELDS[event_type]
    except KeyError:
        raise TypeError(f"no proto payload for {event_type}") from None
    payload: dict[str, Any] = from_json(data)
    if schema_version == _CURRENT_VERSIONS[event_type]:
        # Stored in the current shape: the event's own fields, so only the domain's own
        # are left out (no set of every key to build and subtract for each event).
        for name in _DOMAIN_ONLY[event_type]:
            payload.pop(name, None)
        return field_name, payload
    payload = domain_events.UPCASTERS.upcast(event_type, schema_version, payload)
    for name in payload.keys() - proto_fields:
        del payload[name]
    return field_name, payload


def _payload_fields() -> dict[str, tuple[str, frozenset[str]]]:
    """Per event type: the ``Event.payload`` field that holds it and its message's fields."""
    table: dict[str, tuple[str, frozenset[str]]] = {}
    for field in events_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"].fields:
        message = field.message_type
        if message is not None:
            table[message.name] = (field.name, frozenset(f.name for f in message.fields))
    missing = set(domain_events.EVENT_TYPES) - set(table)
    if missing:
        raise TypeError(f"no proto payload for {', '.join(sorted(missing))}")
    return table


_PAYLOAD_FIELDS = _payload_fields()
_CURRENT_VERSIONS = {name: cls.SCHEMA_VERSION for name, cls in domain_events.EVENT_TYPES.items()}
_DOMAIN_ONLY = {
    name: tuple(f.name for f in fields(cls) if f.name not in _PAYLOAD_FIELDS[name][1])
    for name, cls in domain_events.EVENT_TYPES.items()
}
"""Per event type: its fields that no client sees, such as OrderCreated.created_by."""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NAIVE_EPOCH = dt.datetime(1970, 1, 1)


def _timestamp(moment: dt.datetime) -> dict[str, int]:
    """``Timestamp.FromDatetime`` without its Python time-tuple detour (naive means UTC)."""
    since = moment - (_NAIVE_EPOCH if moment.tzinfo is None else _EPOCH)
    return {"seconds": since.days * 86_400 + since.seconds, "nanos": since.microseconds * 1000}
