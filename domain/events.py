"""Domain events: facts that happened, named in the past tense.

The class name is the event type clients see in ``Event.event_type``. Each class declares
its ``SCHEMA_VERSION``; a change to its fields bumps it and adds an upcaster to
``UPCASTERS`` below, so that events stored in the older shape still read (see
``domain.upcasting``).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import ConfigDict, with_config

from domain.records import record
from domain.upcasting import Payload, Upcasters
from domain.values import NANOS_PER_UNIT

# Events and their parts are immutable records (``domain.records``), built by aggregates
# from values that commands already validated, so building one validates nothing: a
# pydantic model costs 12,000-24,000 instructions per instance built (an OrderCreated of
# one item is six instances), a record about 1,000 per field. pydantic still reads and writes them
# (``domain.mapper``), by the fields declared here; ``FACT_CONFIG`` is its config for
# each of them. Facts carry no request rules (lengths, bounds, patterns): a stored event
# must stay readable whatever the rules for new commands become.
FACT_CONFIG = ConfigDict(extra="forbid")


@with_config(FACT_CONFIG)
@record(kw_only=True)
class MoneyAmount:
    currency_code: str
    units: int = 0
    nanos: int = 0

    @classmethod
    def from_nanos(cls, currency_code: str, total_nanos: int) -> MoneyAmount:
        units, nanos = divmod(total_nanos, NANOS_PER_UNIT)
        return cls(currency_code=currency_code, units=units, nanos=nanos)


@with_config(FACT_CONFIG)
@record(kw_only=True)
class OrderedItem:
    product_id: str
    quantity: int
    unit_price: MoneyAmount
    line_total: MoneyAmount
    """``unit_price`` times ``quantity`` (since OrderCreated version 2)."""


@with_config(FACT_CONFIG)
@record(kw_only=True)
class ShippingAddress:
    recipient: str
    line1: str
    line2: str = ""
    city: str
    region: str = ""
    postal_code: str = ""
    country_code: str


@record(kw_only=True)
class DomainEvent:
    SCHEMA_VERSION: ClassVar[int] = 1
    """The shape of this event's stored payload; bumped with every change to its fields."""

    @property
    def event_type(self) -> str:
        return type(self).__name__


@with_config(FACT_CONFIG)
@record(kw_only=True)
class OrderCreated(DomainEvent):
    SCHEMA_VERSION = 2

    order_id: str
    customer_id: str
    items: tuple[OrderedItem, ...]
    shipping_address: ShippingAddress
    total: MoneyAmount
    created_by: str = ""
    """The authenticated caller who placed the order (needed for the cancel rule)."""


@with_config(FACT_CONFIG)
@record(kw_only=True)
class OrderCancelled(DomainEvent):
    order_id: str
    reason: str
    cancelled_by: str


@with_config(FACT_CONFIG)
@record(kw_only=True)
class StockReserved(DomainEvent):
    product_id: str
    order_id: str
    quantity: int
    available_after: int


@with_config(FACT_CONFIG)
@record(kw_only=True)
class StockReleased(DomainEvent):
    product_id: str
    order_id: str
    quantity: int
    available_after: int


@with_config(FACT_CONFIG)
@record(kw_only=True)
class ProductRestocked(DomainEvent):
    product_id: str
    quantity: int
    available_after: int


EVENT_TYPES: dict[str, type[DomainEvent]] = {
    cls.__name__: cls
    for cls in (OrderCreated, OrderCancelled, StockReserved, StockReleased, ProductRestocked)
}


def _order_created_v1_to_v2(payload: Payload) -> Payload:
    """Version 2 gave each item its ``line_total``; version 1 stored only the unit price."""
    items = []
    for item in payload["items"]:
        price = item["unit_price"]
        nanos = item["quantity"] * (price.get("units", 0) * NANOS_PER_UNIT + price.get("nanos", 0))
        units, nanos = divmod(nanos, NANOS_PER_UNIT)
        line_total = {"currency_code": price["currency_code"], "units": units, "nanos": nanos}
        items.append({**item, "line_total": line_total})
    return {**payload, "items": items}


UPCASTERS = Upcasters(
    current={name: cls.SCHEMA_VERSION for name, cls in EVENT_TYPES.items()},
    steps={("OrderCreated", 1): _order_created_v1_to_v2},
)
