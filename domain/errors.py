"""The domain's error hierarchy.

Every error a client can provoke is a ``DomainError``; the server maps each class to one
gRPC status (see ``server/rpc/status_mapping.py``). ``reason`` is the stable machine-readable code
clients see in ``google.rpc.ErrorInfo``.
"""

from __future__ import annotations

from dataclasses import dataclass


class DomainError(Exception):
    """Base of every error a command can fail with."""

    reason: str = "DOMAIN_ERROR"


class NotFoundError(DomainError):
    """The command names an aggregate that does not exist."""


class OrderNotFoundError(NotFoundError):
    reason = "ORDER_NOT_FOUND"

    def __init__(self, order_id: str) -> None:
        super().__init__(f"order {order_id} does not exist")
        self.order_id = order_id


class ProductNotFoundError(NotFoundError):
    reason = "PRODUCT_NOT_FOUND"

    def __init__(self, product_id: str) -> None:
        super().__init__(f"product {product_id} does not exist")
        self.product_id = product_id


class PermissionDeniedError(DomainError):
    """The caller is authenticated but may not act on this aggregate."""

    reason = "NOT_ORDER_OWNER"


class BusinessRuleViolation(DomainError):
    """The command is well-formed but the aggregate's current state forbids it."""


@dataclass(frozen=True, slots=True)
class Shortage:
    product_id: str
    requested: int
    available: int


class InsufficientInventoryError(BusinessRuleViolation):
    reason = "INSUFFICIENT_INVENTORY"

    def __init__(self, shortages: list[Shortage]) -> None:
        described = ", ".join(
            f"{s.product_id}: requested {s.requested}, available {s.available}" for s in shortages
        )
        super().__init__(f"not enough stock ({described})")
        self.shortages = shortages


class OrderAlreadyCancelledError(BusinessRuleViolation):
    reason = "ORDER_ALREADY_CANCELLED"

    def __init__(self, order_id: str) -> None:
        super().__init__(f"order {order_id} is already cancelled")
        self.order_id = order_id


class CommandIdReusedError(DomainError):
    """The command_id was already used by a different request."""

    reason = "COMMAND_ID_REUSED"

    def __init__(self, command_id: str) -> None:
        super().__init__(f"command_id {command_id} was already used for a different request")
        self.command_id = command_id


class ConcurrencyConflictError(DomainError):
    """A stream moved on between load and append (optimistic concurrency)."""

    reason = "CONCURRENCY_CONFLICT"


class DuplicateCommandError(DomainError):
    """The store already holds a commit for this command_id (raised by ``EventStore.append``)."""

    reason = "DUPLICATE_COMMAND"

    def __init__(self, command_id: str) -> None:
        super().__init__(f"command {command_id} is already recorded")
        self.command_id = command_id


class NoHandlerFoundError(Exception):
    """The bus has no handler for a command type: a wiring mistake, not a client error."""


class HandlerAlreadyRegisteredError(Exception):
    """A second handler was registered for one command type."""


class StoreError(Exception):
    """The event store failed for a reason other than concurrency (driver or I/O error).

    Stores raise it ``from`` the driver's exception so that no driver type leaks upward.
    """


class StoreUnavailableError(StoreError):
    """The store cannot be reached right now (connection refused, pool exhausted); retryable."""
