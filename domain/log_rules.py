"""Rules that hold between the events the aggregates record, for checking a stored log
(``order-gateway verify``): what each event says agrees with its stream, with its place
in that stream, and with the other events of its command.

They restate what ``domain.aggregates`` does when it records events, from the events'
side, so a log that breaks one was not written as the gateway writes (a damaged or
edited store). Request rules (lengths, patterns, bounds) are not among them: a stored
event stays valid whatever the rules for new commands become.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from domain.aggregates import Order, Product
from domain.events import (
    DomainEvent,
    MoneyAmount,
    OrderCancelled,
    OrderCreated,
    ProductRestocked,
    StockReleased,
    StockReserved,
)
from domain.values import NANOS_PER_UNIT

ORDER_EVENT_VERSIONS: Final = {"OrderCreated": 1, "OrderCancelled": 2}
"""Where each event stands in its order's stream: created first, cancelled at most once
after that, nothing else."""

StockChanges = tuple[tuple[str, int], ...]
"""(product_id, quantity) pairs, sorted: an order's items, or what a command reserved or
released for it."""


def stream_of(event: DomainEvent) -> str:
    """The stream ``event`` belongs to: its order's or its product's."""
    if isinstance(event, OrderCreated | OrderCancelled):
        return f"{Order.stream_prefix}-{event.order_id}"
    if isinstance(event, StockReserved | StockReleased | ProductRestocked):
        return f"{Product.stream_prefix}-{event.product_id}"
    raise TypeError(f"no stream for {type(event).__name__}")


class LogRules:
    """Checks a log's events one at a time (``event``) and one command's at a time
    (``command``), in position order. Remembers each order that is not cancelled by one
    number (its items' hash, under its stream id), to check what its cancel releases."""

    def __init__(self) -> None:
        self._open_orders: dict[str, int] = {}

    def event(self, stream_id: str, version: int, event: DomainEvent) -> list[str]:
        """What is wrong with ``event``, stored at ``version`` of ``stream_id``, on its own."""
        problems: list[str] = []
        wanted = ORDER_EVENT_VERSIONS.get(event.event_type)
        if (expected := stream_of(event)) != stream_id:
            problems.append(f"{event.event_type} of {expected} is in stream {stream_id}")
        elif wanted is not None and version != wanted:
            problems.append(
                f"{event.event_type} at version {version} of {stream_id}, where only"
                f" version {wanted} can be one"
            )
        if isinstance(event, OrderCreated):
            problems.extend(_amount_problems(event))
        return problems

    def command(self, events: Sequence[tuple[str, DomainEvent]]) -> list[str]:
        """What is wrong with the (stream id, event) pairs of one command, in order."""
        first = events[0][1]
        rest = [event for _, event in events[1:]]
        if isinstance(first, ProductRestocked) and not rest:
            return []
        if isinstance(first, OrderCreated) and _all(rest, StockReserved):
            items = _items(first)
            self._open_orders[events[0][0]] = hash(items)
            problems = _other_orders(first.order_id, rest)
            if (reserved := _changes(rest)) != items:
                problems.append(
                    f"order {first.order_id} reserves {_listed(reserved)}"
                    f" for its items {_listed(items)}"
                )
            return problems
        if isinstance(first, OrderCancelled) and _all(rest, StockReleased):
            items_hash = self._open_orders.pop(events[0][0], None)
            problems = _other_orders(first.order_id, rest)
            # An order not seen created is already reported, by its stream's versions.
            if items_hash is not None and hash(released := _changes(rest)) != items_hash:
                problems.append(
                    f"order {first.order_id} releases {_listed(released)}, not its items"
                )
            return problems
        kinds = ", ".join(event.event_type for _, event in events)
        return [f"a command's events ({kinds}) are not those of any command"]


def _all(events: Sequence[DomainEvent], kind: type[DomainEvent]) -> bool:
    return all(isinstance(event, kind) for event in events)


def _items(order: OrderCreated) -> StockChanges:
    return tuple(sorted((item.product_id, item.quantity) for item in order.items))


def _changes(events: Sequence[DomainEvent]) -> StockChanges:
    return tuple(
        sorted(
            (event.product_id, event.quantity)
            for event in events
            if isinstance(event, StockReserved | StockReleased)
        )
    )


def _other_orders(order_id: str, events: Sequence[DomainEvent]) -> list[str]:
    return [
        f"{event.event_type} of {event.product_id} for order {event.order_id},"
        f" in a command of order {order_id}"
        for event in events
        if isinstance(event, StockReserved | StockReleased) and event.order_id != order_id
    ]


def _listed(changes: StockChanges) -> str:
    return ", ".join(f"{product_id} x {quantity}" for product_id, quantity in changes) or "nothing"


def _amount_problems(order: OrderCreated) -> list[str]:
    """An order's amounts: one currency, each line total its price times its quantity,
    the total the sum of its lines."""
    currency = order.total.currency_code
    problems = [
        f"order {order.order_id}: {item.product_id} is priced in {amount.currency_code},"
        f" the order in {currency}"
        for item in order.items
        for amount in (item.unit_price, item.line_total)
        if amount.currency_code != currency
    ]
    lines = 0
    for item in order.items:
        line = _nanos(item.line_total)
        if line != item.quantity * _nanos(item.unit_price):
            problems.append(
                f"order {order.order_id}: {item.product_id}'s line total"
                f" {_money(item.line_total)} is not {item.quantity} x {_money(item.unit_price)}"
            )
        lines += line
    if _nanos(order.total) != lines:
        problems.append(
            f"order {order.order_id}: total {_money(order.total)} is not the sum of its lines"
            f" ({_money(MoneyAmount.from_nanos(currency, lines))})"
        )
    return problems


def _nanos(amount: MoneyAmount) -> int:
    return amount.units * NANOS_PER_UNIT + amount.nanos


def _money(amount: MoneyAmount) -> str:
    fraction = f"{amount.nanos:09d}".rstrip("0")
    return f"{amount.units}{'.' + fraction if fraction else ''} {amount.currency_code}"
