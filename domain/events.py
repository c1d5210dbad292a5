"""Domain events: facts that happened, named in the past tense.

The class name is the event type clients see in ``Event.event_type``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Fact(BaseModel):
    """Part of an event. Facts carry no request rules (lengths, bounds, patterns): a stored
    event must stay readable whatever the rules for new commands become."""

    model_config = ConfigDict(frozen=True, extra="forbid", from_attributes=True)


class MoneyAmount(Fact):
    currency_code: str
    units: int = 0
    nanos: int = 0


class OrderedItem(Fact):
    product_id: str
    quantity: int
    unit_price: MoneyAmount


class ShippingAddress(Fact):
    recipient: str
    line1: str
    line2: str = ""
    city: str
    region: str = ""
    postal_code: str = ""
    country_code: str


class DomainEvent(Fact):
    @property
    def event_type(self) -> str:
        return type(self).__name__


class OrderCreated(DomainEvent):
    order_id: str
    customer_id: str
    items: tuple[OrderedItem, ...]
    shipping_address: ShippingAddress
    total: MoneyAmount
    created_by: str = ""
    """The authenticated caller who placed the order (needed for the cancel rule)."""


class OrderCancelled(DomainEvent):
    order_id: str
    reason: str
    cancelled_by: str


class StockReserved(DomainEvent):
    product_id: str
    order_id: str
    quantity: int
    available_after: int


class StockReleased(DomainEvent):
    product_id: str
    order_id: str
    quantity: int
    available_after: int


class ProductRestocked(DomainEvent):
    product_id: str
    quantity: int
    available_after: int


EVENT_TYPES: dict[str, type[DomainEvent]] = {
    cls.__name__: cls
    for cls in (OrderCreated, OrderCancelled, StockReserved, StockReleased, ProductRestocked)
}
