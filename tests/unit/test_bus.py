"""Handlers, middleware and the command bus, on the in-memory store."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import uuid
from typing import Any

import pytest

from domain import handlers
from domain.bus import CommandBus, Next, Result
from domain.commands import CancelOrder, Command, CreateOrder, RestockProduct
from domain.errors import (
    CommandIdReusedError,
    ConcurrencyConflictError,
    HandlerAlreadyRegisteredError,
    InsufficientInventoryError,
    NoHandlerFoundError,
    OrderNotFoundError,
    ProductNotFoundError,
    StoreError,
)
from domain.events import ProductRestocked
from domain.fingerprints import fingerprint
from domain.mapper import to_domain_event, to_new_event
from domain.middleware import IdempotencyMiddleware, RetryOnConflictMiddleware
from domain.ports import CommandRecord, Commit, RecordedEvent
from domain.unit_of_work import UnitsOfWork
from server.bootstrap import bootstrap
from server.stores.memory import MemoryEventStore

ADDRESS = {"recipient": "Ada", "line1": "1 Road", "city": "London", "country_code": "GB"}


def create(*items: tuple[str, int], command_id: str = "", user_id: str = "") -> CreateOrder:
    return CreateOrder.model_validate(
        {
            "command_id": command_id,
            "customer_id": str(uuid.uuid4()),
            "items": [
                {"product_id": p, "quantity": q, "unit_price": {"currency_code": "EUR", "units": 1}}
                for p, q in items
            ],
            "shipping_address": ADDRESS,
            "user_id": user_id,
        }
    )


def restock(product_id: str, quantity: int, command_id: str = "") -> RestockProduct:
    return RestockProduct(command_id=command_id, product_id=product_id, quantity=quantity)


@pytest.fixture
def store() -> MemoryEventStore:
    return MemoryEventStore()


@pytest.fixture
def bus(store: MemoryEventStore) -> CommandBus:
    return bootstrap(store)


async def test_create_order_commits_order_and_reservations_atomically(
    bus: CommandBus, store: MemoryEventStore
) -> None:
    await bus.dispatch(restock("a", 5))
    await bus.dispatch(restock("b", 5))
    events = await bus.dispatch(create(("b", 2), ("a", 1)))
    assert [(e.event_type, e.stream_id) for e in events][1:] == [
        ("StockReserved", "product-b"),
        ("StockReserved", "product-a"),
    ]
    assert events[0].event_type == "OrderCreated"
    assert [e.position for e in events] == [3, 4, 5]
    assert {e.command_id for e in events} == {events[0].command_id}


async def test_a_failed_order_appends_nothing(bus: CommandBus, store: MemoryEventStore) -> None:
    await bus.dispatch(restock("a", 5))
    with pytest.raises(InsufficientInventoryError):
        await bus.dispatch(create(("a", 6)))
    with pytest.raises(ProductNotFoundError):
        await bus.dispatch(create(("a", 1), ("ghost", 1)))
    assert await store.head_position() == 1


async def test_cancel_unknown_order_is_not_found(bus: CommandBus) -> None:
    with pytest.raises(OrderNotFoundError):
        await bus.dispatch(CancelOrder(order_id=str(uuid.uuid4())))


async def test_cancel_releases_stock_for_a_later_order(bus: CommandBus) -> None:
    await bus.dispatch(restock("a", 1))
    created = await bus.dispatch(create(("a", 1)))
    order_id = to_domain_event(created[0]).order_id  # type: ignore[attr-defined]
    cancelled = await bus.dispatch(CancelOrder(order_id=order_id, by_admin=True))
    assert [e.event_type for e in cancelled] == ["OrderCancelled", "StockReleased"]
    assert (await bus.dispatch(create(("a", 1))))[1].event_type == "StockReserved"


async def test_same_command_id_replays_the_same_events(
    bus: CommandBus, store: MemoryEventStore
) -> None:
    command_id = str(uuid.uuid4())
    first = await bus.dispatch(restock("a", 5, command_id))
    again = await bus.dispatch(restock("a", 5, command_id))
    assert again == first
    assert await store.head_position() == 1


async def test_same_command_id_for_another_request_is_refused(bus: CommandBus) -> None:
    command_id = str(uuid.uuid4())
    await bus.dispatch(restock("a", 5, command_id))
    with pytest.raises(CommandIdReusedError):
        await bus.dispatch(restock("a", 6, command_id))
    with pytest.raises(CommandIdReusedError):
        await bus.dispatch(create(("a", 1), command_id=command_id))


async def test_same_command_id_from_another_caller_is_refused(bus: CommandBus) -> None:
    await bus.dispatch(restock("a", 5))
    command_id = str(uuid.uuid4())
    await bus.dispatch(create(("a", 1), command_id=command_id, user_id="alice"))
    with pytest.raises(CommandIdReusedError):
        await bus.dispatch(create(("a", 1), command_id=command_id, user_id="bob"))


def legacy_fingerprint(command: Command) -> str:
    """How commands were fingerprinted before fingerprints carried a version prefix."""
    body = command.model_dump(mode="json", exclude=command.IDEMPOTENCY_EXCLUDED)
    text = json.dumps([type(command).__name__, body], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


async def test_commands_recorded_with_the_legacy_fingerprint_still_replay(
    bus: CommandBus, store: MemoryEventStore
) -> None:
    """A retry after an upgrade finds its command recorded under the old fingerprint."""
    command = restock("a", 5, str(uuid.uuid4()))
    recorded = await store.append(
        Commit(
            command_id=command.command_id,
            fingerprint=legacy_fingerprint(command),
            correlation_id=command.command_id,
            user_id="",
            occurred_at=command.timestamp,
            expected_versions={"product-a": 0},
            events=[
                to_new_event(
                    ProductRestocked(product_id="a", quantity=5, available_after=5),
                    str(uuid.uuid4()),
                    "product-a",
                    1,
                )
            ],
        )
    )
    assert await bus.dispatch(restock("a", 5, command.command_id)) == recorded
    with pytest.raises(CommandIdReusedError):
        await bus.dispatch(restock("a", 6, command.command_id))
    assert await store.head_position() == 1


def test_fingerprints_ignore_only_the_envelope() -> None:
    command_id = str(uuid.uuid4())
    first = restock("a", 5, command_id)
    retried = RestockProduct(
        command_id=command_id, product_id="a", quantity=5, correlation_id="another"
    )
    assert fingerprint(first) == fingerprint(retried)
    assert fingerprint(first) != fingerprint(restock("a", 6, command_id))
    assert fingerprint(first) != fingerprint(
        RestockProduct(command_id=command_id, product_id="a", quantity=5, user_id="bob")
    )
    cancel = {"command_id": command_id, "order_id": str(uuid.uuid4())}
    # Whether the caller is an admin is decided by its credentials, not part of the request.
    assert fingerprint(CancelOrder.model_validate({**cancel, "by_admin": True})) == fingerprint(
        CancelOrder.model_validate(cancel)
    )


ENVELOPE = {"command_id", "timestamp", "correlation_id"}
"""What a retry of the same request may change: its id, when it was sent, how it is traced."""

REQUESTS_AND_OTHER_VALUES: dict[type[Command], tuple[dict[str, Any], dict[str, Any]]] = {
    # Per command type: a request, and for each of its fields another value for it.
    CreateOrder: (
        {
            "customer_id": "00000000-0000-4000-8000-000000000001",
            "items": [{"product_id": "a", "quantity": 1, "unit_price": {"currency_code": "EUR"}}],
            "shipping_address": ADDRESS,
            "user_id": "alice",
        },
        {
            "customer_id": "00000000-0000-4000-8000-000000000002",
            "items": [{"product_id": "a", "quantity": 2, "unit_price": {"currency_code": "EUR"}}],
            "shipping_address": {**ADDRESS, "line2": "Flat 2"},
            "user_id": "bob",
        },
    ),
    CancelOrder: (
        {"order_id": "00000000-0000-4000-8000-000000000001", "reason": "", "user_id": "alice"},
        {
            "order_id": "00000000-0000-4000-8000-000000000002",
            "reason": "ordered twice",
            "user_id": "bob",
        },
    ),
    RestockProduct: (
        {"product_id": "a", "quantity": 5, "user_id": "alice"},
        {"product_id": "b", "quantity": 6, "user_id": "bob"},
    ),
}


@pytest.mark.parametrize("kind", REQUESTS_AND_OTHER_VALUES, ids=lambda kind: kind.__name__)
def test_every_field_of_a_request_outside_the_envelope_is_in_its_fingerprint(
    kind: type[Command],
) -> None:
    """A command_id reused for a request that differs in any field the caller sent (a
    CancelOrder's reason too) is another request, refused; never a replay of the first."""
    assert set(REQUESTS_AND_OTHER_VALUES) == set(Command.__subclasses__()), "a new command type"
    request, others = REQUESTS_AND_OTHER_VALUES[kind]
    # Whether a cancel is an admin's is decided by its credentials, not by the request
    # (server_chose_id, left out of every dump, is no part of a request either).
    not_compared = {"by_admin"} if kind is CancelOrder else set()
    fields = {name for name, info in kind.model_fields.items() if not info.exclude}
    assert set(others) == fields - ENVELOPE - not_compared, "every field needs another value"

    envelope = {"command_id": str(uuid.uuid4()), "correlation_id": "first"}
    first = kind.model_validate({**envelope, **request})
    for name, other in others.items():
        changed = kind.model_validate({**envelope, **request, name: other})
        assert fingerprint(changed) != fingerprint(first), f"{kind.__name__}.{name}"
    # The envelope, and only it, may differ on a retry.
    later = first.timestamp + dt.timedelta(seconds=1)
    retried = kind.model_validate(
        {**request, "command_id": first.command_id, "timestamp": later, "correlation_id": ""}
    )
    assert fingerprint(retried) == fingerprint(first)


async def test_a_failed_command_is_not_remembered(bus: CommandBus) -> None:
    command_id = str(uuid.uuid4())
    with pytest.raises(ProductNotFoundError):
        await bus.dispatch(create(("a", 1), command_id=command_id))
    await bus.dispatch(restock("a", 1))
    events = await bus.dispatch(create(("a", 1), command_id=command_id))
    assert events[0].command_id == command_id


async def test_concurrent_orders_never_oversell(bus: CommandBus) -> None:
    await bus.dispatch(restock("hot", 20))
    results = await asyncio.gather(
        *(bus.dispatch(create(("hot", 1))) for _ in range(100)), return_exceptions=True
    )
    succeeded = [r for r in results if isinstance(r, list)]
    refused = [r for r in results if isinstance(r, InsufficientInventoryError)]
    assert (len(succeeded), len(refused)) == (20, 80)
    remaining = sorted(to_domain_event(r[1]).available_after for r in succeeded)  # type: ignore[attr-defined]
    assert remaining == list(range(20))


async def test_duplicate_commands_racing_commit_once(
    bus: CommandBus, store: MemoryEventStore
) -> None:
    await bus.dispatch(restock("a", 100))
    command = create(("a", 1), command_id=str(uuid.uuid4()))
    results = await asyncio.gather(*(bus.dispatch(command) for _ in range(10)))
    assert all(r == results[0] for r in results)
    assert await store.head_position() == 3


class ConflictingStore(MemoryEventStore):
    """Loses the first ``conflicts`` appends to an imaginary other replica."""

    def __init__(self, conflicts: int) -> None:
        super().__init__()
        self.conflicts = conflicts

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        if self.conflicts:
            self.conflicts -= 1
            raise ConcurrencyConflictError("another replica moved the stream on")
        return await super().append(commit)


async def test_conflicts_are_retried_until_they_succeed() -> None:
    store = ConflictingStore(conflicts=3)
    events = await bootstrap(store).dispatch(restock("a", 1))
    assert events[0].position == 1


async def test_conflicts_left_after_retries_surface() -> None:
    store = ConflictingStore(conflicts=100)
    with pytest.raises(ConcurrencyConflictError):
        await bootstrap(store).dispatch(restock("a", 1))
    assert store.conflicts == 100 - 8


async def test_register_refuses_a_second_handler_and_dispatch_an_unknown_type() -> None:
    bus = CommandBus()

    async def handler(command: Any) -> Result:
        return []

    bus.register(RestockProduct, handler)
    with pytest.raises(HandlerAlreadyRegisteredError):
        bus.register(RestockProduct, handler)
    with pytest.raises(NoHandlerFoundError):
        await bus.dispatch(CancelOrder(order_id=str(uuid.uuid4())))


async def test_middleware_runs_outermost_first() -> None:
    calls: list[str] = []

    def tracer(name: str) -> Any:
        async def middleware(command: Command, call_next: Next) -> Result:
            calls.append(f"{name} in")
            result = await call_next(command)
            calls.append(f"{name} out")
            return result

        return middleware

    async def handler(command: Any) -> Result:
        calls.append("handler")
        return []

    bus = CommandBus(middleware=[tracer("outer"), tracer("inner"), RetryOnConflictMiddleware()])
    bus.register(RestockProduct, handler)
    await bus.dispatch(restock("a", 1))
    assert calls == ["outer in", "inner in", "handler", "inner out", "outer out"]


class CountingStore(MemoryEventStore):
    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0
        self.appends = 0

    async def find_command(self, command_id: str) -> Any:
        self.lookups += 1
        return await super().find_command(command_id)

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        self.appends += 1
        return await super().append(commit)


async def test_commands_without_an_id_get_distinct_ids_and_skip_the_lookup() -> None:
    store = CountingStore()
    bus = bootstrap(store)
    first = await bus.dispatch(RestockProduct(product_id="a", quantity=1))
    second = await bus.dispatch(RestockProduct(product_id="a", quantity=1))
    assert first[0].command_id != second[0].command_id
    assert await store.head_position() == 2
    assert store.lookups == 0


async def test_a_new_client_chosen_id_costs_no_lookup() -> None:
    store = CountingStore()
    await bootstrap(store).dispatch(restock("a", 1, command_id=str(uuid.uuid4())))
    assert (store.lookups, store.appends) == (0, 1)


async def test_a_retry_of_a_command_this_process_committed_is_looked_up_not_run() -> None:
    store = CountingStore()
    bus = bootstrap(store)
    command = restock("a", 1, command_id=str(uuid.uuid4()))
    first = await bus.dispatch(command)
    assert await bus.dispatch(command) == first
    assert (store.lookups, store.appends) == (1, 1)


async def test_only_the_latest_recorded_ids_are_remembered() -> None:
    store = CountingStore()
    bus = CommandBus(middleware=[IdempotencyMiddleware(store, remembered=2)])
    bus.register(RestockProduct, UnitsOfWork(store).handler(handlers.restock_product))
    commands = [restock("a", 1, command_id=str(uuid.uuid4())) for _ in range(3)]
    for command in commands:
        await bus.dispatch(command)
    await bus.dispatch(commands[2])
    assert (store.lookups, store.appends) == (1, 3)  # remembered: looked up, not run
    await bus.dispatch(commands[0])
    # Forgotten: it ran again, the store refused it, and it was replayed.
    assert (store.lookups, store.appends) == (2, 4)


async def test_a_retry_of_a_command_another_replica_committed_is_refused_then_replayed() -> None:
    store = CountingStore()
    command = restock("a", 1, command_id=str(uuid.uuid4()))
    first = await bootstrap(store).dispatch(command)
    other_replica = bootstrap(store)
    assert await other_replica.dispatch(command) == first
    # It ran, the store refused its append as a duplicate, and the record was read.
    assert (store.lookups, store.appends) == (1, 2)
    assert await store.head_position() == 1
    # Now this replica has seen it recorded: a further retry is looked up, not run.
    assert await other_replica.dispatch(command) == first
    assert (store.lookups, store.appends) == (2, 2)


class DamagedRecordStore(MemoryEventStore):
    """A store whose records point where ``events_of`` says: at no event, or at another
    command's (damage a restore of one table and not the other would leave)."""

    def __init__(self) -> None:
        super().__init__()
        self.events_of: dict[str, tuple[RecordedEvent, ...]] = {}

    async def find_command(self, command_id: str) -> CommandRecord | None:
        found = await super().find_command(command_id)
        if found is None or command_id not in self.events_of:
            return found
        return CommandRecord(command_id, found.fingerprint, self.events_of[command_id])


@pytest.mark.parametrize("points_at", ["no event", "another command's events"])
async def test_a_damaged_record_is_refused_not_replayed(points_at: str) -> None:
    store = DamagedRecordStore()
    bus = bootstrap(store)
    other = await bus.dispatch(restock("b", 2))
    command = restock("a", 1, command_id=str(uuid.uuid4()))
    await bus.dispatch(command)
    store.events_of[command.command_id] = () if points_at == "no event" else tuple(other)
    expected = (
        "points at no event"
        if points_at == "no event"
        else f"points at position 1, an event of command {other[0].command_id}"
    )
    # Whether the retry is looked up first (this process committed it) or run and
    # refused as a duplicate (another replica's), the record is what answers it.
    for retrying in (bus, bootstrap(store)):
        with pytest.raises(StoreError, match=expected):
            await retrying.dispatch(command)
    assert await store.head_position() == 2


async def test_a_command_refused_by_a_rule_looks_its_id_up() -> None:
    store = CountingStore()
    with pytest.raises(OrderNotFoundError):
        await bootstrap(store).dispatch(
            CancelOrder(order_id=str(uuid.uuid4()), command_id=str(uuid.uuid4()))
        )
    assert store.lookups == 1  # a retry of a committed command would replay here


async def test_a_cached_product_never_decides_against_the_store(store: MemoryEventStore) -> None:
    """Two buses on one store stand for two replicas, each with its own aggregate cache."""
    replica_a, replica_b = bootstrap(store), bootstrap(store)
    await replica_a.dispatch(restock("a", 1))
    await replica_a.dispatch(create(("a", 1)))  # replica A now caches "a" with 0 left

    await replica_b.dispatch(restock("a", 2))  # A's cache does not know
    events = await replica_a.dispatch(create(("a", 2)))
    assert events[1].event_type == "StockReserved"

    with pytest.raises(InsufficientInventoryError):
        await replica_a.dispatch(create(("a", 1)))


async def test_a_product_another_replica_created_is_not_unknown_here(
    store: MemoryEventStore,
) -> None:
    replica_a, replica_b = bootstrap(store), bootstrap(store)
    with pytest.raises(ProductNotFoundError):
        await replica_b.dispatch(create(("new", 1)))  # B now caches "new" as unknown
    await replica_a.dispatch(restock("new", 5))
    events = await replica_b.dispatch(create(("new", 1)))
    assert events[1].event_type == "StockReserved"


async def test_a_stale_cache_costs_a_retry_not_an_oversell(store: MemoryEventStore) -> None:
    replica_a, replica_b = bootstrap(store), bootstrap(store)
    await replica_a.dispatch(restock("a", 2))
    await replica_a.dispatch(create(("a", 1)))  # A caches "a" at 1 left
    await replica_b.dispatch(create(("a", 1)))  # B sells the last one
    with pytest.raises(InsufficientInventoryError):
        await replica_a.dispatch(create(("a", 1)))
    assert [e.event_type for e in await store.read_all()].count("StockReserved") == 2


class _AnswersLate(MemoryEventStore):
    """Commits each append at once; the first one it answers only after its caller has
    stopped waiting (a deadline)."""

    def __init__(self) -> None:
        super().__init__()
        self.appends = 0
        self.hold_next = True

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        self.appends += 1
        recorded = await super().append(commit)
        if self.hold_next:
            self.hold_next = False
            await asyncio.Event().wait()
        return recorded


async def test_a_stream_whose_append_was_cancelled_is_read_again_before_the_next_command() -> None:
    # The append committed although its caller stopped waiting: decided on the cache's
    # previous head, the next command on the stream lost a race with it and appended
    # twice (a conflict, then a retry).
    store = _AnswersLate()
    bus = bootstrap(store)
    first = asyncio.create_task(bus.dispatch(RestockProduct(product_id="p", quantity=1)))
    await asyncio.sleep(0.05)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await bus.dispatch(RestockProduct(product_id="p", quantity=2))
    assert store.appends == 2
    assert [e.stream_version for e in await store.read_stream("product-p")] == [1, 2]
