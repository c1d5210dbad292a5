"""Event-sourced aggregates: the only place business rules live.

An aggregate's state is the fold of its stream's events (``apply``). A command method
checks the rules against that state and, if they hold, records new events, which it
also applies, so the aggregate is always the state after its pending events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Self

from domain.errors import (
    InsufficientInventoryError,
    OrderAlreadyCancelledError,
    PermissionDeniedError,
    ProductNotFoundError,
    Shortage,
)
from domain.events import (
    DomainEvent,
    MoneyAmount,
    OrderCancelled,
    OrderCreated,
    OrderedItem,
    ProductRestocked,
    ShippingAddress,
    StockReleased,
    StockReserved,
)
from domain.values import Address, Money, OrderItem


class Aggregate:
    """Version tracking and pending events, common to every aggregate."""

    stream_prefix: str = ""
    SNAPSHOT_VERSION: ClassVar[int] = 0
    """The shape of this aggregate's snapshot state, bumped with every change to it;
    0: never snapshotted (its streams stay short)."""

    def __init__(self, aggregate_id: str) -> None:
        self.id = aggregate_id
        self.stream_id = f"{self.stream_prefix}-{aggregate_id}"
        self.version = 0
        self.pending: list[DomainEvent] = []

    @property
    def committed_version(self) -> int:
        """The stream version the aggregate was loaded at (before its pending events)."""
        return self.version - len(self.pending)

    def apply(self, event: DomainEvent) -> None:
        raise NotImplementedError

    def replay(self, events: Sequence[DomainEvent]) -> None:
        for event in events:
            self.apply(event)
            self.version += 1

    def _record(self, event: DomainEvent) -> None:
        self.apply(event)
        self.version += 1
        self.pending.append(event)

    def mark_committed(self) -> None:
        self.pending = []

    def snapshot_state(self) -> dict[str, Any]:
        """The state ``restore_state`` rebuilds, as JSON-ready values."""
        raise NotImplementedError

    def restore_state(self, state: dict[str, Any], version: int) -> None:
        """Become the aggregate that ``snapshot_state`` described, at stream ``version``."""
        raise NotImplementedError

    def clone(self) -> Self:
        """An independent copy, so a cached aggregate is never changed by a failed command."""
        # Attributes are copied one level deep, as copy.copy would, without its
        # __reduce_ex__ round trip: state values are immutable (ints, strs, tuples of
        # frozen models), so sharing them is safe.
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.pending = []
        return twin


_STOCK_CHANGES = (ProductRestocked, StockReserved, StockReleased)
"""The events that set a product's stock: a tuple, not a union written in ``apply``,
which would build the union on every call (about 1,500 instructions)."""


class Product(Aggregate):
    """Stock of one product. It exists once it has been restocked."""

    stream_prefix = "product"

    def __init__(self, product_id: str) -> None:
        super().__init__(product_id)
        self.available = 0

    @property
    def exists(self) -> bool:
        return self.version > 0

    def restock(self, quantity: int) -> None:
        self._record(
            ProductRestocked(
                product_id=self.id, quantity=quantity, available_after=self.available + quantity
            )
        )

    def reserve(self, order_id: str, quantity: int) -> None:
        if not self.exists:
            raise ProductNotFoundError(self.id)
        if quantity > self.available:
            raise InsufficientInventoryError([Shortage(self.id, quantity, self.available)])
        self._record(
            StockReserved(
                product_id=self.id,
                order_id=order_id,
                quantity=quantity,
                available_after=self.available - quantity,
            )
        )

    def release(self, order_id: str, quantity: int) -> None:
        self._record(
            StockReleased(
                product_id=self.id,
                order_id=order_id,
                quantity=quantity,
                available_after=self.available + quantity,
            )
        )

    def apply(self, event: DomainEvent) -> None:
        if isinstance(event, _STOCK_CHANGES):
            self.available = event.available_after

    # 2: sealed with a digest (``domain.snapshots``); 1's, unsealed, are ignored.
    SNAPSHOT_VERSION = 2

    def snapshot_state(self) -> dict[str, Any]:
        return {"available": self.available}

    def restore_state(self, state: dict[str, Any], version: int) -> None:
        self.available = int(state["available"])
        self.version = version


class Order(Aggregate):
    """An order: its items, who placed it, and whether it is cancelled."""

    stream_prefix = "order"

    def __init__(self, order_id: str) -> None:
        super().__init__(order_id)
        self.items: tuple[OrderedItem, ...] = ()
        self.created_by = ""
        self.cancelled = False

    @property
    def exists(self) -> bool:
        return self.version > 0

    @classmethod
    def place(
        cls,
        order_id: str,
        customer_id: str,
        items: Sequence[OrderItem],
        shipping_address: Address,
        created_by: str,
        products: Mapping[str, Product],
    ) -> Order:
        """Create an order and reserve every item's stock, or change nothing.

        Every product must exist (else ProductNotFoundError for the first missing one)
        and have enough stock (else InsufficientInventoryError listing every shortage).
        """
        for item in items:
            if not products[item.product_id].exists:
                raise ProductNotFoundError(item.product_id)
        shortages = [
            Shortage(item.product_id, item.quantity, products[item.product_id].available)
            for item in items
            if item.quantity > products[item.product_id].available
        ]
        if shortages:
            raise InsufficientInventoryError(shortages)
        currency = items[0].unit_price.currency_code
        # Each line total once: it is two properties and four attributes of pydantic
        # models (about 4,300 instructions an item), and both the items and the total
        # need it.
        line_totals = [item.line_total_nanos for item in items]
        order = cls(order_id)
        order._record(
            OrderCreated(
                order_id=order_id,
                customer_id=customer_id,
                items=tuple(map(_ordered, items, line_totals)),
                shipping_address=_shipping_address(shipping_address),
                total=MoneyAmount.from_nanos(currency, sum(line_totals)),
                created_by=created_by,
            )
        )
        for item in items:
            products[item.product_id].reserve(order_id, item.quantity)
        return order

    def cancel(
        self, reason: str, cancelled_by: str, by_admin: bool, products: Mapping[str, Product]
    ) -> None:
        """Cancel the order and release its stock; only its creator or an admin may."""
        if not by_admin and cancelled_by != self.created_by:
            raise PermissionDeniedError(f"only the creator of order {self.id} may cancel it")
        if self.cancelled:
            raise OrderAlreadyCancelledError(self.id)
        self._record(OrderCancelled(order_id=self.id, reason=reason, cancelled_by=cancelled_by))
        for item in self.items:
            products[item.product_id].release(self.id, item.quantity)

    def apply(self, event: DomainEvent) -> None:
        if isinstance(event, OrderCreated):
            self.items = event.items
            self.created_by = event.created_by
        elif isinstance(event, OrderCancelled):
            self.cancelled = True


def _amount(money: Money) -> MoneyAmount:
    return MoneyAmount(currency_code=money.currency_code, units=money.units, nanos=money.nanos)


def _ordered(item: OrderItem, line_total_nanos: int) -> OrderedItem:
    price = item.unit_price
    return OrderedItem(
        product_id=item.product_id,
        quantity=item.quantity,
        unit_price=_amount(price),
        line_total=MoneyAmount.from_nanos(price.currency_code, line_total_nanos),
    )


def _shipping_address(address: Address) -> ShippingAddress:
    # The address's fields are the event's, by name: read as one dict, for each attribute
    # read of a pydantic model costs about 550 instructions (its ``__getattr__`` hook
    # keeps Python from specialising the read).
    return ShippingAddress(**address.__dict__)
