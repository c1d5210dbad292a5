"""Commands on one hot stream are pipelined: decided on the state a queued commit will
leave, while that commit waits for its group commit. What a caller may rely on, with a
store that holds commits until the test lets them through, in order, or fails one.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from domain import handlers
from domain.bus import CommandBus
from domain.commands import CancelOrder, CreateOrder, RestockProduct
from domain.errors import (
    ConcurrencyConflictError,
    DomainError,
    DuplicateCommandError,
    InsufficientInventoryError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)
from domain.events import ProductRestocked, StockReleased, StockReserved
from domain.locks import StreamLocks
from domain.mapper import to_domain_event, to_new_event
from domain.middleware import RetryOnConflictMiddleware
from domain.ports import Commit, RecordedEvent
from domain.unit_of_work import AggregateCache, UnitOfWork, UnitsOfWork
from server.bootstrap import HANDLERS, bootstrap
from server.stores.memory import MemoryEventStore
from server.stores.sqlite import SQLiteEventStore
from tests.unit.test_bus import create, restock

WAIT = 10.0


class HeldStore(MemoryEventStore):
    """Queues appends in the order they start and commits them, in that order, only when
    ``flush`` says: a group commit that has not happened yet.

    ``fail[n]`` makes the n-th append (counted from 0) fail with that error instead;
    ``intrude[n]`` is a commit another process writes right after the n-th append fails.
    An append whose caller stopped waiting is still committed, as SQLite's writer does,
    or with ``drop_abandoned`` dropped, as PostgreSQL drops one not sent yet.
    """

    def __init__(self, drop_abandoned: bool = False) -> None:
        super().__init__()
        self.drop_abandoned = drop_abandoned
        self.queued: list[tuple[int, Commit, asyncio.Future[list[RecordedEvent]]]] = []
        self.started = 0
        self.fail: dict[int, BaseException] = {}
        self.intrude: dict[int, Commit] = {}

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        future: asyncio.Future[list[RecordedEvent]] = asyncio.get_running_loop().create_future()
        self.queued.append((self.started, commit, future))
        self.started += 1
        return await future

    async def flush(self, count: int | None = None) -> None:
        """Commit (or fail) the first ``count`` queued appends (all by default), in order."""
        batch, self.queued = self.queued[:count], self.queued[len(self.queued[:count]) :]
        for n, commit, future in batch:
            if future.cancelled():
                if not self.drop_abandoned:
                    await super().append(commit)
                continue
            if n in self.fail:
                future.set_exception(self.fail[n])
                if n in self.intrude:
                    await super().append(self.intrude[n])
                continue
            try:
                future.set_result(await super().append(commit))
            except DomainError as error:
                future.set_exception(error)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110 - the bus's tasks change it, no event to wait on
            await asyncio.sleep(0)


async def run_through(store: HeldStore, calls: Sequence[Awaitable[Any]]) -> list[Any]:
    """Run ``calls`` to the end, letting every commit through as it is queued."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    async with asyncio.timeout(WAIT):
        while not all(task.done() for task in tasks):
            await asyncio.sleep(0.001)
            await store.flush()
    return [task.exception() or task.result() for task in tasks]


def available(events: Sequence[RecordedEvent]) -> list[int]:
    """``available_after`` of each stock event of ``events``, in order."""
    stock = [to_domain_event(e) for e in events]
    return [
        e.available_after
        for e in stock
        if isinstance(e, ProductRestocked | StockReserved | StockReleased)
    ]


def assert_exact_arithmetic(stream: Sequence[RecordedEvent]) -> None:
    """Each stock event of a product's stream leaves exactly what the one before left,
    minus what it reserved or plus what it put back; never less than nothing."""
    left = 0
    for event in (to_domain_event(e) for e in stream):
        if isinstance(event, ProductRestocked):
            left += event.quantity
        elif isinstance(event, StockReserved):
            left -= event.quantity
        elif isinstance(event, StockReleased):
            left += event.quantity
        assert isinstance(event, ProductRestocked | StockReserved | StockReleased)
        assert event.available_after == left
        assert left >= 0


async def test_commands_on_one_stream_are_decided_while_the_first_waits_for_its_commit() -> None:
    store = HeldStore()
    bus = bootstrap(store)
    await run_through(store, [bus.dispatch(restock("hot", 10))])

    orders = [asyncio.ensure_future(bus.dispatch(create(("hot", 1)))) for _ in range(5)]
    # All five are decided and queued before the first commit is durable.
    await until(lambda: len(store.queued) == 5)
    assert not any(order.done() for order in orders)

    await store.flush(2)
    await until(lambda: orders[1].done())
    # Answered once their own commit is durable, not before.
    assert [order.done() for order in orders] == [True, True, False, False, False]

    await store.flush()
    answers = await asyncio.gather(*orders)
    assert [available(events) for events in answers] == [[9], [8], [7], [6], [5]]
    assert_exact_arithmetic(await store.read_stream("product-hot"))


@pytest.mark.parametrize(
    "error",
    [
        StoreError("the disk failed"),
        DuplicateCommandError(str(uuid.uuid4())),
        ConcurrencyConflictError("another process"),
    ],
    ids=["store error", "duplicate command id", "conflict"],
)
async def test_a_failed_commit_in_the_middle_of_a_chain_is_never_built_upon(
    error: BaseException,
) -> None:
    """The second of four pipelined orders fails, and another process restocks the
    product at the very version the second would have left. The two orders decided on
    the second's state must not commit on it: they are decided again on what did."""
    store = HeldStore()
    bus = bootstrap(store)
    await run_through(store, [bus.dispatch(restock("hot", 10))])
    store.fail[store.started + 1] = error
    restocked = ProductRestocked(product_id="hot", quantity=5, available_after=14)
    store.intrude[store.started + 1] = Commit(
        command_id=str(uuid.uuid4()),
        fingerprint="elsewhere",
        correlation_id="elsewhere",
        user_id="",
        occurred_at=restock("hot", 5).timestamp,
        expected_versions={"product-hot": 2},
        events=[to_new_event(restocked, str(uuid.uuid4()), "product-hot", 3)],
    )

    orders = [asyncio.ensure_future(bus.dispatch(create(("hot", 1)))) for _ in range(4)]
    await until(lambda: len(store.queued) == 4)
    outcomes = await run_through(store, orders)

    stream = await store.read_stream("product-hot")
    assert_exact_arithmetic(stream)
    stored = {e.event_id for e in await store.read_all()}
    for outcome in outcomes:
        if isinstance(outcome, list):
            assert {e.event_id for e in outcome} <= stored, "answered OK only with what is stored"
    if not isinstance(error, ConcurrencyConflictError):
        assert isinstance(outcomes[1], type(error))
        assert available(stream) == [10, 9, 14, 13, 12]
    else:  # a lost race is run again
        assert all(isinstance(outcome, list) for outcome in outcomes)
        assert available(stream) == [10, 9, 14, 13, 12, 11]


@pytest.mark.parametrize("drop_abandoned", [False, True], ids=["written", "dropped"])
async def test_callers_who_stop_waiting_in_a_chain_leave_it_consistent(
    drop_abandoned: bool,
) -> None:
    """Of four pipelined orders, the second and the last are cancelled (their callers'
    deadlines passed) while their commits are queued. The store may still write those
    commits or drop them: the third order, decided on the second's state, commits on what
    the store holds, and the stream is never left waiting for an answer that will not come."""
    store = HeldStore(drop_abandoned)
    bus = bootstrap(store)
    await run_through(store, [bus.dispatch(restock("hot", 4))])

    orders = [asyncio.ensure_future(bus.dispatch(create(("hot", 1)))) for _ in range(4)]
    await until(lambda: len(store.queued) == 4)
    orders[1].cancel()
    orders[3].cancel()
    outcomes = await run_through(store, [orders[0], orders[2]])

    assert orders[1].cancelled() and orders[3].cancelled()
    assert_exact_arithmetic(await store.read_stream("product-hot"))
    assert [available(events) for events in outcomes] == [[3], [1] if not drop_abandoned else [2]]
    # A rejection is confirmed on durable state once the stream's queued commits are
    # answered: a cancelled one still counted as queued would hold this order forever.
    (rejected,) = await run_through(store, [bus.dispatch(create(("hot", 5)))])
    assert isinstance(rejected, InsufficientInventoryError)


@pytest.mark.parametrize("first_commits", [True, False])
async def test_a_rejection_decided_on_queued_state_is_confirmed_on_durable_state(
    first_commits: bool,
) -> None:
    store = HeldStore()
    bus = bootstrap(store)
    await run_through(store, [bus.dispatch(restock("hot", 2))])
    if not first_commits:
        store.fail[store.started] = StoreError("the disk failed")

    first = asyncio.ensure_future(bus.dispatch(create(("hot", 2))))
    await until(lambda: len(store.queued) == 1)
    # Decided on the state the first order leaves (nothing left): not answered yet.
    second = asyncio.ensure_future(bus.dispatch(create(("hot", 1))))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not second.done()

    outcomes = await run_through(store, [first, second])
    if first_commits:
        assert isinstance(outcomes[1], InsufficientInventoryError)
        assert available(await store.read_stream("product-hot")) == [2, 0]
    else:
        assert isinstance(outcomes[0], StoreError)
        assert available(outcomes[1]) == [1], "decided again on the stock that is stored"


async def test_concurrent_retries_of_one_command_on_a_hot_stream_commit_once() -> None:
    store = HeldStore()
    bus = bootstrap(store)
    await run_through(store, [bus.dispatch(restock("hot", 10))])
    command = create(("hot", 1), command_id=str(uuid.uuid4()))
    others = [bus.dispatch(create(("hot", 1))) for _ in range(2)]
    same = [bus.dispatch(command) for _ in range(3)]

    outcomes = await run_through(store, [others[0], *same, others[1]])

    answers = [[e.event_id for e in events] for events in outcomes[1:4]]
    assert answers[0] == answers[1] == answers[2], "every retry gets the one commit's events"
    stream = await store.read_stream("product-hot")
    assert len(stream) == 1 + 3
    assert_exact_arithmetic(stream)


async def test_orders_on_several_hot_products_never_deadlock_nor_oversell(
    tmp_path: Path,
) -> None:
    """Many callers, each order on one to three of four scarce products, items listed in
    any order, with cancels mixed in, on the SQLite store's real group commit."""
    store = await SQLiteEventStore.open(tmp_path / "events.db")
    bus: CommandBus = bootstrap(store)
    products = [f"p{n}" for n in range(4)]
    try:
        for product in products:
            await bus.dispatch(restock(product, 40))
        rng = random.Random(7)

        async def caller() -> None:
            for _ in range(6):
                chosen = rng.sample(products, rng.randint(1, 3))
                items = [(product, rng.randint(1, 3)) for product in chosen]
                try:
                    events = await bus.dispatch(create(*items))
                except InsufficientInventoryError:
                    continue
                if rng.random() < 0.3:
                    order_id = to_domain_event(events[0]).order_id  # type: ignore[attr-defined]
                    await bus.dispatch(cancel(order_id))

        async with asyncio.timeout(60):
            await asyncio.gather(*(caller() for _ in range(40)))
        for product in products:
            assert_exact_arithmetic(await store.read_stream(f"product-{product}"))
    finally:
        await store.close()


def cancel(order_id: str) -> CancelOrder:
    return CancelOrder(order_id=order_id, reason="changed my mind", by_admin=True)


async def test_a_stream_read_afresh_behind_a_queued_commit_is_read_once_it_is_durable() -> None:
    """A stream must be read afresh (a replica's turn at it begins: another replica may
    have written) while a commit on it still waits: the commands after it are decided on
    that commit's state once it is durable, and none of them loses a race against it."""
    store = HeldStore()
    cache, locks = AggregateCache(), StreamLocks()

    async def run(command: CreateOrder | RestockProduct) -> list[RecordedEvent]:
        uow = UnitOfWork(store, cache, locks, command)
        if isinstance(command, RestockProduct):
            return await handlers.restock_product(command, uow)
        return await handlers.create_order(command, uow)

    await run_through(store, [run(restock("hot", 10))])
    before = asyncio.ensure_future(run(create(("hot", 1))))
    await until(lambda: len(store.queued) == 1)

    cache.mark_stale("product-hot")
    outcomes = await run_through(store, [before, *(run(create(("hot", 1))) for _ in range(3))])

    assert [available(events) for events in outcomes] == [[9], [8], [7], [6]]


def bus_retrying_once(store: MemoryEventStore) -> CommandBus:
    """The bus ``bootstrap`` builds, with one attempt per command: a conflict is answered
    as it comes, not retried away."""
    units = UnitsOfWork(store)
    bus = CommandBus(middleware=[RetryOnConflictMiddleware(attempts=1)])
    for command_type, handler in HANDLERS.items():
        bus.register(command_type, units.handler(handler))
    return bus


@pytest.mark.parametrize(
    "fault",
    [StoreFullError("disk full"), StoreUnavailableError("connection lost")],
    ids=["full", "unavailable"],
)
async def test_a_command_decided_on_commits_that_failed_for_a_fault_is_answered_with_it(
    fault: StoreError,
) -> None:
    """The first of three pipelined orders fails because the store is full; the two
    decided on its state conflict. Out of retries, they are answered with the store's
    fault, which the caller can act on, not with ABORTED."""
    store = HeldStore()
    bus = bus_retrying_once(store)
    await run_through(store, [bus.dispatch(restock("hot", 10))])
    store.fail[store.started] = fault

    orders = [asyncio.ensure_future(bus.dispatch(create(("hot", 1)))) for _ in range(3)]
    await until(lambda: len(store.queued) == 3)
    outcomes = await run_through(store, orders)

    assert [type(outcome) for outcome in outcomes] == [type(fault)] * 3
    assert isinstance(outcomes[1].__cause__, ConcurrencyConflictError)
    assert available(await store.read_stream("product-hot")) == [10]


async def test_a_conflict_with_another_writer_is_still_aborted() -> None:
    store = HeldStore()
    bus = bus_retrying_once(store)
    await run_through(store, [bus.dispatch(restock("hot", 10))])
    store.fail[store.started] = ConcurrencyConflictError("another process")

    orders = [asyncio.ensure_future(bus.dispatch(create(("hot", 1)))) for _ in range(2)]
    await until(lambda: len(store.queued) == 2)
    outcomes = await run_through(store, orders)

    assert [type(outcome) for outcome in outcomes] == [ConcurrencyConflictError] * 2
