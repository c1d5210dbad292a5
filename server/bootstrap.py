"""The composition root: wires a store into handlers, middleware and the command bus.

Nothing happens at import time; ``bootstrap`` builds a fresh object graph per call.
"""

from __future__ import annotations

from collections.abc import Sequence

from domain import handlers
from domain.bus import CommandBus, Handler, Middleware
from domain.commands import CancelOrder, Command, CreateOrder, RestockProduct
from domain.locks import StreamLocks
from domain.middleware import IdempotencyMiddleware, LoggingMiddleware, RetryOnConflictMiddleware
from domain.ports import EventStore, RecordedEvent
from domain.unit_of_work import AggregateCache, HandlerFunction, run_handler

HANDLERS: dict[type[Command], HandlerFunction] = {
    CreateOrder: handlers.create_order,
    CancelOrder: handlers.cancel_order,
    RestockProduct: handlers.restock_product,
}


def bootstrap(
    store: EventStore,
    cache_capacity: int = 10_000,
    middleware: Sequence[Middleware] = (),
    cache: AggregateCache | None = None,
) -> CommandBus:
    """``middleware`` (metrics, tracing) runs outermost, so it sees each command's whole
    dispatch: idempotent replays and conflict retries included. ``cache``: one made by the
    caller, who keeps it to forget aggregates that another process changed (``--workers``);
    by default a new one of ``cache_capacity``."""
    cache = cache if cache is not None else AggregateCache(cache_capacity)
    locks = StreamLocks()
    bus = CommandBus(
        middleware=[
            *middleware,
            LoggingMiddleware(),
            IdempotencyMiddleware(store),
            RetryOnConflictMiddleware(),
        ]
    )
    for command_type, handler in HANDLERS.items():
        bus.register(command_type, _with_unit_of_work(handler, store, cache, locks))
    return bus


def _with_unit_of_work(
    handler: HandlerFunction,
    store: EventStore,
    cache: AggregateCache,
    locks: StreamLocks,
) -> Handler:
    async def handle(command: Command) -> list[RecordedEvent]:
        return await run_handler(handler, command, store, cache, locks)

    return handle
