"""The composition root: wires a store into handlers, middleware and the command bus.

Nothing happens at import time; ``bootstrap`` builds a fresh object graph per call.
"""

from __future__ import annotations

from collections.abc import Sequence

from domain import handlers
from domain.bus import CommandBus, Middleware
from domain.commands import CancelOrder, Command, CreateOrder, RestockProduct
from domain.middleware import IdempotencyMiddleware, LoggingMiddleware, RetryOnConflictMiddleware
from domain.ports import EventStore, SharedStreamLocks
from domain.snapshots import Snapshots
from domain.unit_of_work import AggregateCache, HandlerFunction, UnitsOfWork

HANDLERS: dict[type[Command], HandlerFunction] = {
    CreateOrder: handlers.create_order,
    CancelOrder: handlers.cancel_order,
    RestockProduct: handlers.restock_product,
}


def bootstrap(
    store: EventStore,
    cache_capacity: int = 10_000,
    middleware: Sequence[Middleware] = (),
    shared_locks: SharedStreamLocks | None = None,
    snapshots: Snapshots | None = None,
    cache: AggregateCache | None = None,
) -> CommandBus:
    """``middleware`` (metrics, tracing) runs outermost, so it sees each command's whole
    dispatch: idempotent replays and conflict retries included. ``shared_locks``: the
    store's, when several processes write it (replicas take turns at contended streams).
    Without ``snapshots``, aggregates are rebuilt from their whole streams. ``cache``: one
    the caller keeps, to mark streams another process changed (``--workers``); by default
    a new one of ``cache_capacity``."""
    units = UnitsOfWork(store, cache_capacity, shared_locks, snapshots, cache)
    bus = CommandBus(
        middleware=[
            *middleware,
            LoggingMiddleware(),
            IdempotencyMiddleware(store),
            RetryOnConflictMiddleware(),
        ]
    )
    for command_type, handler in HANDLERS.items():
        bus.register(command_type, units.handler(handler))
    return bus
