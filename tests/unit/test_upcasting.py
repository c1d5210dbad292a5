"""Upcasting: events stored in an older shape read as the current one, through chains of
pure steps, in every reader (domain replay, proto mapping)."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from pydantic import TypeAdapter

from domain.errors import UnreadableEventError
from domain.events import UPCASTERS, OrderCreated, ProductRestocked
from domain.mapper import decode, decode_all, to_domain_event, to_new_event
from domain.ports import EventPayload, RecordedEvent
from domain.upcasting import Payload, UnknownSchemaVersionError, Upcasters
from server.rpc.mapping import proto_event_fields

V1_ORDER_CREATED = {
    "order_id": "o-1",
    "customer_id": "c-1",
    "items": [
        {"product_id": "a", "quantity": 3, "unit_price": {"currency_code": "EUR", "units": 2}},
        {
            "product_id": "b",
            "quantity": 7,
            "unit_price": {"currency_code": "EUR", "units": 0, "nanos": 990_000_000},
        },
    ],
    "shipping_address": {"recipient": "Ada", "line1": "1 Road", "city": "L", "country_code": "GB"},
    "total": {"currency_code": "EUR", "units": 12, "nanos": 930_000_000},
}


def record(event_type: str, payload: Payload, schema_version: int) -> RecordedEvent:
    return RecordedEvent(
        "e-1", "s-1", 1, 1, dt.datetime.now(dt.UTC), "c", "c", "", event_type,
        json.dumps(payload).encode(), schema_version,
    )  # fmt: skip


def test_a_version_1_order_gets_its_line_totals() -> None:
    event = to_domain_event(record("OrderCreated", V1_ORDER_CREATED, 1))
    assert isinstance(event, OrderCreated)
    assert [(i.line_total.units, i.line_total.nanos) for i in event.items] == [
        (6, 0),
        (6, 930_000_000),
    ]


def test_without_the_upcaster_a_version_1_order_does_not_read() -> None:
    with pytest.raises(ValueError, match="line_total"):
        TypeAdapter(OrderCreated).validate_python(V1_ORDER_CREATED)


def test_proto_mapping_upcasts_too() -> None:
    fields = proto_event_fields(record("OrderCreated", V1_ORDER_CREATED, 1))
    assert fields["order_created"]["items"][1]["line_total"]["nanos"] == 930_000_000


def test_new_events_are_stored_in_the_current_version_and_read_back_as_they_are() -> None:
    event = to_domain_event(record("OrderCreated", V1_ORDER_CREATED, 1))
    new = to_new_event(event, "e-2", "order-o-1", 1)
    assert new.schema_version == OrderCreated.SCHEMA_VERSION == 2
    restocked = to_new_event(
        ProductRestocked(product_id="a", quantity=1, available_after=1), "e", "s", 1
    )
    assert restocked.schema_version == 1
    again = to_domain_event(record("OrderCreated", json.loads(new.data), 2))
    assert again == event


def test_a_version_newer_than_the_code_is_refused_not_misread() -> None:
    with pytest.raises(UnknownSchemaVersionError, match="version 3"):
        decode("OrderCreated", 3, json.dumps(V1_ORDER_CREATED).encode())
    # A recorded one is named by its position, for the log of the call that meets it.
    with pytest.raises(UnreadableEventError, match="OrderCreated schema version 3") as refused:
        to_domain_event(record("OrderCreated", V1_ORDER_CREATED, 3))
    assert isinstance(refused.value.__cause__, UnknownSchemaVersionError)
    with pytest.raises(UnknownSchemaVersionError):
        UPCASTERS.upcast("ProductRestocked", 0, {})


def test_steps_compose_from_any_stored_version() -> None:
    def v1_to_v2(p: Payload) -> Payload:
        return {**p, "b": p["a"] * 2}

    def v2_to_v3(p: Payload) -> Payload:
        return {"sum": p["a"] + p["b"]}

    chain = Upcasters({"E": 3}, {("E", 1): v1_to_v2, ("E", 2): v2_to_v3})
    assert chain.upcast("E", 1, {"a": 1}) == {"sum": 3}
    assert chain.upcast("E", 2, {"a": 1, "b": 5}) == {"sum": 6}
    assert chain.upcast("E", 3, {"sum": 9}) == {"sum": 9}


def test_a_gap_in_a_chain_is_refused_when_declared() -> None:
    with pytest.raises(ValueError, match="no upcaster from version 2"):
        Upcasters({"E": 3}, {("E", 1): dict})
    with pytest.raises(ValueError, match="leads past"):
        Upcasters({"E": 2}, {("E", 2): dict})


def test_a_tail_decoded_at_once_reads_as_each_event_alone() -> None:
    """``decode_all`` validates runs of one type together: the same events, in order,
    upcast where stored in an older version."""
    restocks = [
        to_new_event(ProductRestocked(product_id="p", quantity=1, available_after=n), "", "s", n)
        for n in range(1, 4)
    ]
    payloads: list[EventPayload] = [
        (f"e-{n}", event.event_type, event.schema_version, event.data)
        for n, event in enumerate(restocks)
    ]
    payloads[1:1] = [
        ("v1-a", "OrderCreated", 1, json.dumps(V1_ORDER_CREATED).encode()),
        ("v1-b", "OrderCreated", 1, json.dumps(V1_ORDER_CREATED).encode()),
    ]
    assert decode_all(payloads) == [decode(t, v, data) for _, t, v, data in payloads]
    assert [type(e).__name__ for e in decode_all(payloads)] == [
        "ProductRestocked",
        "OrderCreated",
        "OrderCreated",
        "ProductRestocked",
        "ProductRestocked",
    ]
    assert [getattr(e, "available_after", None) for e in decode_all(payloads)] == [
        1, None, None, 2, 3
    ]  # fmt: skip


def test_a_payload_that_does_not_fit_fails_the_tail_it_is_in() -> None:
    good = json.dumps({"product_id": "p", "quantity": 1, "available_after": 1}).encode()
    bad = json.dumps({"product_id": "p", "quantity": "many"}).encode()
    with pytest.raises(ValueError):
        decode_all([("a", "ProductRestocked", 1, good), ("b", "ProductRestocked", 1, bad)])
    # Two objects in one payload are no two events: each payload is parsed on its own.
    joined = good + b"," + good
    with pytest.raises(ValueError):
        decode_all([("a", "ProductRestocked", 1, good), ("b", "ProductRestocked", 1, joined)])
