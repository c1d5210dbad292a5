"""The unit of work: loads aggregates, and commits their pending events as one ``Commit``.

Loaded aggregates come from a bounded cache and are brought up to date by reading only
the events after the cached version, so loading a hot product costs the same at stream
length 10 and 100,000. A stream lock is held from load to commit (see ``domain.locks``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from domain.aggregates import Aggregate, Order, Product
from domain.commands import Command
from domain.errors import BusinessRuleViolation, ConcurrencyConflictError, OrderNotFoundError
from domain.fingerprints import fingerprint
from domain.ids import new_uuid
from domain.locks import StreamLocks
from domain.mapper import to_domain_event, to_new_event
from domain.ports import Commit, EventStore, RecordedEvent

A = TypeVar("A", bound=Aggregate)


class AggregateCache:
    """Least-recently-used committed aggregates, keyed by stream id."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, Aggregate] = OrderedDict()

    def get(self, stream_id: str) -> Aggregate | None:
        aggregate = self._entries.get(stream_id)
        if aggregate is not None:
            self._entries.move_to_end(stream_id)
        return aggregate

    def put(self, aggregate: Aggregate) -> None:
        self._entries[aggregate.stream_id] = aggregate
        self._entries.move_to_end(aggregate.stream_id)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def discard(self, stream_id: str) -> None:
        self._entries.pop(stream_id, None)


class UnitOfWork:
    """One command's view of the store, used as ``async with uow:``.

    Loading an aggregate takes its stream lock, held until the block ends. Callers load
    the order (if any) before the products, and products in one call, so locks are
    always taken in sorted stream order ("order-…" sorts before "product-…").
    """

    def __init__(
        self,
        store: EventStore,
        cache: AggregateCache,
        locks: StreamLocks,
        command: Command,
        trust_cache: bool = True,
    ) -> None:
        self._store = store
        self._cache = cache
        self._locks = locks
        self._command = command
        self._trust_cache = trust_cache
        self._held: list[tuple[str, ...]] = []
        """Stream locks taken by this unit of work, released when its block ends."""
        self.used_cache = False
        """Some aggregate came from the cache without a look at the store."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        while self._held:
            self._locks.release(self._held.pop())

    async def order(self, order_id: str) -> Order:
        """The order, brought up to date; OrderNotFoundError if it was never placed."""
        order = Order(order_id)
        self._held.append(await self._locks.acquire([order.stream_id]))
        order = await self._load(order)
        if not order.exists:
            raise OrderNotFoundError(order_id)
        return order

    async def products(self, product_ids: Iterable[str]) -> dict[str, Product]:
        """Each product, brought up to date (``exists`` is False for an unknown one)."""
        blanks = {pid: Product(pid) for pid in product_ids}
        self._held.append(await self._locks.acquire(blank.stream_id for blank in blanks.values()))
        return {pid: await self._load(blank) for pid, blank in blanks.items()}

    async def _load(self, blank: A) -> A:
        cached = self._cache.get(blank.stream_id)
        if isinstance(cached, type(blank)) and self._trust_cache:
            # Optimistic: the append's expected-version check catches a stream that another
            # process moved on, and ``run_handler`` re-decides a rejection on fresh state.
            self.used_cache = True
            return cached.clone()
        aggregate: A = cached.clone() if isinstance(cached, type(blank)) else blank
        records = await self._store.read_stream(aggregate.stream_id, aggregate.version)
        aggregate.replay([to_domain_event(record) for record in records])
        return aggregate

    async def commit(self, aggregates: Sequence[Aggregate]) -> list[RecordedEvent]:
        """Append every aggregate's pending events, in the given order, atomically."""
        command = self._command
        events = [
            to_new_event(event, new_uuid(), aggregate.stream_id, aggregate.committed_version + n)
            for aggregate in aggregates
            for n, event in enumerate(aggregate.pending, start=1)
        ]
        commit = Commit(
            command_id=command.command_id,
            fingerprint=fingerprint(command),
            correlation_id=command.correlation_id or command.command_id,
            user_id=command.user_id,
            occurred_at=command.timestamp,
            expected_versions={a.stream_id: a.committed_version for a in aggregates},
            events=events,
        )
        try:
            recorded = await self._store.append(commit)
        except ConcurrencyConflictError:
            # Another process moved a stream on: our cached copies may be stale.
            for aggregate in aggregates:
                self._cache.discard(aggregate.stream_id)
            raise
        for aggregate in aggregates:
            aggregate.mark_committed()
            self._cache.put(aggregate)
        return recorded


HandlerFunction = Callable[[Any, UnitOfWork], Awaitable[list[RecordedEvent]]]


async def run_handler(
    handler: HandlerFunction,
    command: Command,
    store: EventStore,
    cache: AggregateCache,
    locks: StreamLocks,
) -> list[RecordedEvent]:
    """Run ``handler`` in a unit of work that trusts the aggregate cache.

    A success is safe on cached state: the store refuses the append if a stream moved on
    (and the retry middleware runs the command again on fresh state). A rejection is not
    checked by anyone, so one that rests on cached state is decided again on state read
    from the store: another process may have restocked the product meanwhile.
    """
    uow = UnitOfWork(store, cache, locks, command)
    try:
        return await handler(command, uow)
    except BusinessRuleViolation:
        if not uow.used_cache:
            raise
    return await handler(command, UnitOfWork(store, cache, locks, command, trust_cache=False))
