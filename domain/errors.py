"""The gateway's errors: three trees, each under a base of its own.

- ``DomainError``: a command refused, for a reason the client can provoke and act on.
  ``server/rpc/status_mapping.py`` maps each class to one gRPC status; ``reason`` is the
  stable machine-readable code clients see in ``google.rpc.ErrorInfo``.
- ``StoreError``: the event store failed. Stores raise it ``from`` the driver's exception
  at their boundary, so no driver type leaks upward.
- ``ConfigurationError``: the gateway is set up wrongly (settings, files, wiring). Found
  when it starts; ``order-gateway serve`` prints it and exits with status 2.

docs/architecture.md draws the whole tree with the status of each error.
"""

from __future__ import annotations

from dataclasses import dataclass


class DomainError(Exception):
    """A command refused: what a client can provoke through a command, never a fault.

    The aggregates' rules (``BusinessRuleViolation``), an aggregate that does not exist
    (``NotFoundError``), the caller's rights on it (``PermissionDeniedError``), and the
    outcomes of the store's consistency checks that the command pipeline handles: a
    stream that moved on (``ConcurrencyConflictError``, retried, ABORTED once retries are
    spent) and a command id already recorded (``DuplicateCommandError``, answered as a
    replay or ``CommandIdReusedError``). Each maps to one gRPC status; none is logged as
    a server error.
    """

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

    fault: StoreError | None = None
    """The store's fault behind the conflict, if the command was decided on queued commits
    that failed with one (``domain.unit_of_work``): the conflict is its consequence."""


class DuplicateCommandError(DomainError):
    """The store already holds a commit for this command_id (raised by ``EventStore.append``)."""

    reason = "DUPLICATE_COMMAND"

    def __init__(self, command_id: str) -> None:
        super().__init__(f"command {command_id} is already recorded")
        self.command_id = command_id


class ConfigurationError(ValueError):
    """The gateway is set up wrongly: a setting, a file it names, or its wiring.

    A ``ValueError``, as the checks of values that raise it are.
    """


class NoHandlerFoundError(ConfigurationError):
    """The bus has no handler for a command type: a wiring mistake, not a client error."""


class HandlerAlreadyRegisteredError(ConfigurationError):
    """A second handler was registered for one command type."""


class StoreError(Exception):
    """The event store failed (driver or I/O error, a schema it cannot use).

    Stores raise it ``from`` the driver's exception so that no driver type leaks upward.
    Concurrency and a repeated command id are not failures: they are ``DomainError``s.
    Anything but ``StoreUnavailableError`` and ``StoreFullError`` reaches a client as
    INTERNAL.
    """


class StoreUnavailableError(StoreError):
    """The store cannot be reached right now (connection refused, pool exhausted, I/O
    error); retryable: a command that failed with it either committed or did not, and a
    retry with its command_id finds out which."""

    reason = "STORE_UNAVAILABLE"


class StoreFullError(StoreError):
    """The store is out of space; the append that hit it committed nothing."""

    reason = "STORE_FULL"


class UnreadableEventError(StoreError):
    """A stored event that does not decode as its type: its payload is not JSON, or not
    its type's, or its type or version is one this release does not know (a damaged
    row, one edited by hand, or a later release's event). INTERNAL to the client; the
    message, which the log shows, names the event, so that an operator can find it."""

    def __init__(self, position: int, stream_id: str, event_type: str, reason: str) -> None:
        super().__init__(
            f"the stored event at position {position} ({event_type} of {stream_id}) cannot"
            f" be read ({reason}): the store is damaged there, or a later release wrote it;"
            " order-gateway verify reports what else is"
        )
        self.position = position
