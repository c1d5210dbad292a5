"""The same create-and-cancel work written with the ``eventsourcing`` library, for comparison.

An Order aggregate (created, cancelled) and a Product aggregate with stock (restocked,
reserved, released), written as that library's documentation shows. Placing an order
saves the new order and the reserving product atomically in one ``save``; cancelling
loads both, records the cancellation and the release, and saves them together: the
gateway's two commands, event for event. Rules are checked before an event is triggered,
as the gateway's aggregates do.
"""

from __future__ import annotations

import uuid
from typing import Any

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate, event


class EsProduct(Aggregate):
    @event("Registered")
    def __init__(self, product_id: str) -> None:
        self.product_id = product_id
        self.available = 0

    @staticmethod
    def create_id(product_id: str) -> uuid.UUID:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"product-{product_id}")

    @event("StockAdded")
    def add_stock(self, quantity: int) -> None:
        self.available += quantity

    def reserve(self, order_id: uuid.UUID, quantity: int) -> None:
        if quantity > self.available:
            raise ValueError(f"requested {quantity}, available {self.available}")
        self._reserved(order_id, quantity, self.available - quantity)

    @event("StockReserved")
    def _reserved(self, order_id: uuid.UUID, quantity: int, available_after: int) -> None:
        self.available = available_after

    @event("StockReleased")
    def release(self, order_id: uuid.UUID, quantity: int) -> None:
        self.available += quantity


class EsOrder(Aggregate):
    @event("OrderCreated")
    def __init__(self, customer_id: str, product_id: str, quantity: int, unit_price: int) -> None:
        self.customer_id = customer_id
        self.product_id = product_id
        self.quantity = quantity
        self.total = quantity * unit_price
        self.cancelled = False

    def cancel(self, reason: str) -> None:
        if self.cancelled:
            raise ValueError("order already cancelled")
        self._cancelled(reason)

    @event("OrderCancelled")
    def _cancelled(self, reason: str) -> None:
        self.cancelled = True


class Shop(Application[uuid.UUID]):
    def restock(self, product_id: str, quantity: int) -> None:
        product_uuid = EsProduct.create_id(product_id)
        try:
            product: EsProduct = self.repository.get(product_uuid)
        except AggregateNotFoundError:
            product = EsProduct(product_id)
        product.add_stock(quantity)
        self.save(product)

    def create_order(self, customer_id: str, product_id: str, quantity: int) -> uuid.UUID:
        product: EsProduct = self.repository.get(EsProduct.create_id(product_id))
        order = EsOrder(customer_id, product_id, quantity, unit_price=10)
        product.reserve(order.id, quantity)
        self.save(order, product)
        return order.id

    def cancel_order(self, order_id: uuid.UUID, reason: str) -> None:
        order: EsOrder = self.repository.get(order_id)
        product: EsProduct = self.repository.get(EsProduct.create_id(order.product_id))
        order.cancel(reason)
        product.release(order.id, order.quantity)
        self.save(order, product)


def open_shop(env: dict[str, Any]) -> Shop:
    """A Shop on the persistence module ``env`` names, with an aggregate cache like ours."""
    return Shop(env={"AGGREGATE_CACHE_MAXSIZE": "10000", **env})
