"""Domain events: facts that happened, named in the past tense.

The class name is the event type clients see in ``Event.event_type``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from domain.values import Address, Money, OrderItem


class DomainEvent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @property
    def event_type(self) -> str:
        return type(self).__name__


class OrderCreated(DomainEvent):
    order_id: str
    customer_id: str
    items: tuple[OrderItem, ...]
    shipping_address: Address
    total: Money
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
