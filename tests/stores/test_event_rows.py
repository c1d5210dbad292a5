"""Stored rows (``server.stores.event_rows``): what SQLite and PostgreSQL hand a catching-up
subscription instead of ``RecordedEvent``s must be the same events, mapped to the same
messages."""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import grpc
import psycopg
import pytest
from orders.v1 import event_stream_service_pb2

from domain import events as domain_events
from domain.errors import UnreadableEventError
from domain.mapper import to_new_event
from domain.ports import Commit, RecordedEvent
from server.rpc.mapping import event_response, row_event_response
from server.rpc.status_mapping import INTERNAL_MESSAGE
from server.stores.event_rows import EventRow, EventRowReader, StreamRowReader
from server.stores.factory import open_store, sqlite_path
from tests.clients import item, order_request
from tests.stores.test_postgres_specific import commit
from tests.subscription_support import StreamReader, connect, running_gateway

SubscribeResponse = event_stream_service_pb2.SubscribeResponse
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MICROSECOND = dt.timedelta(microseconds=1)

PRICE = domain_events.MoneyAmount(currency_code="EUR", units=12, nanos=500_000_000)
ORDER = str(uuid.uuid4())
EVENTS: list[domain_events.DomainEvent] = [
    domain_events.ProductRestocked(product_id="sku-1", quantity=5, available_after=5),
    domain_events.OrderCreated(
        order_id=ORDER,
        customer_id=str(uuid.uuid4()),
        items=(
            domain_events.OrderedItem(
                product_id="sku-1",
                quantity=2,
                unit_price=PRICE,
                line_total=domain_events.MoneyAmount(currency_code="EUR", units=25),
            ),
        ),
        shipping_address=domain_events.ShippingAddress(
            recipient="Zoë Ünicode", line1="1 Rue", city="Paris", country_code="FR"
        ),
        total=domain_events.MoneyAmount(currency_code="EUR", units=25),
        created_by="user-7",  # domain-only: not in the proto
    ),
    domain_events.StockReserved(product_id="sku-1", order_id=ORDER, quantity=2, available_after=3),
    domain_events.OrderCancelled(order_id=ORDER, reason="changed my mind", cancelled_by="user-7"),
    domain_events.StockReleased(product_id="sku-1", order_id=ORDER, quantity=2, available_after=5),
]
TIMES = [
    dt.datetime(2026, 11, 29, 12, 30, 45, 123_456, tzinfo=dt.UTC),
    EPOCH,
    # Before the epoch: Timestamp's nanos stay non-negative (floor division).
    EPOCH - MICROSECOND,
    dt.datetime(1901, 2, 3, 4, 5, 6, 7, tzinfo=dt.UTC),
]


def as_row(record: RecordedEvent) -> EventRow:
    return (
        record.event_id,
        record.stream_id,
        record.stream_version,
        record.position,
        (record.occurred_at - EPOCH) // MICROSECOND,
        record.command_id,
        record.correlation_id,
        record.user_id,
        record.event_type,
        record.data,
        record.schema_version,
    )


def recorded(event: domain_events.DomainEvent, occurred_at: dt.datetime) -> RecordedEvent:
    new = to_new_event(event, str(uuid.uuid4()), "stream-1", 3)
    return RecordedEvent(
        new.event_id,
        "stream-1",
        3,
        42,
        occurred_at,
        "cmd",
        "corr",
        "user-7",
        new.event_type,
        new.data,
        new.schema_version,
    )


@pytest.mark.parametrize("occurred_at", TIMES)
@pytest.mark.parametrize("event", EVENTS, ids=lambda event: event.event_type)
def test_a_row_maps_to_the_message_of_its_recorded_event(
    event: domain_events.DomainEvent, occurred_at: dt.datetime
) -> None:
    record = recorded(event, occurred_at)
    from_row = row_event_response(SubscribeResponse, as_row(record))
    assert from_row == event_response(SubscribeResponse, record)
    assert from_row.event.occurred_at.ToDatetime(dt.UTC) == occurred_at
    assert from_row.event.WhichOneof("payload") is not None


def test_a_row_of_an_unknown_event_type_is_refused_like_a_record() -> None:
    record = RecordedEvent("e", "s", 1, 1, EPOCH, "c", "c", "", "OrderShipped", b"{}")
    named = r"the stored event at position 1 \(OrderShipped of s\) cannot be read"
    with pytest.raises(UnreadableEventError, match=named) as from_record:
        event_response(SubscribeResponse, record)
    with pytest.raises(UnreadableEventError, match=named) as from_row:
        row_event_response(SubscribeResponse, as_row(record))
    for refused in (from_record.value, from_row.value):
        assert isinstance(refused.__cause__, TypeError)
        assert "no proto payload for OrderShipped" in str(refused)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/events.db"
    else:
        yield request.getfixturevalue("fresh_postgres_url")


async def test_durable_stores_read_rows_that_are_their_recorded_events(store_url: str) -> None:
    store = await open_store(store_url)
    try:
        assert isinstance(store, EventRowReader)
        for n, occurred_at in enumerate(TIMES):
            # One commit per time, each with every event type, on streams of its own.
            events = [
                to_new_event(event, str(uuid.uuid4()), f"stream-{n}-{k}", 1)
                for k, event in enumerate(EVENTS)
            ]
            await store.append(
                Commit(
                    command_id=str(uuid.uuid4()),
                    fingerprint="f",
                    correlation_id=f"corr-{n}",
                    user_id=f"user-{n}",
                    occurred_at=occurred_at,
                    expected_versions={event.stream_id: 0 for event in events},
                    events=events,
                )
            )
        head = await store.head_position()
        assert head == len(TIMES) * len(EVENTS)
        for after, limit in [(0, 1000), (0, 3), (7, 6), (head - 1, 10), (head, 10)]:
            records = await store.read_all(after, limit)
            rows = await store.read_all_rows(after, limit)
            assert rows == [as_row(record) for record in records], (after, limit)
    finally:
        await store.close()


async def test_durable_stores_read_one_streams_rows_after_a_position_and_their_head(
    store_url: str,
) -> None:
    store = await open_store(store_url)
    try:
        assert isinstance(store, StreamRowReader)
        assert isinstance(store, EventRowReader)
        assert await store.read_stream_rows_after("stream-a", 0, 10) == ([], 0)
        # Three streams interleaved, one event per commit.
        streams = ["stream-a", "stream-b", "stream-a", "stream-c", "stream-b", "stream-a"] * 4
        versions: dict[str, int] = {}
        for stream_id in streams:
            versions[stream_id] = versions.get(stream_id, 0) + 1
            await store.append(commit((stream_id, versions[stream_id])))
        head = await store.head_position()
        everything = await store.read_all_rows(0, 1000)
        assert len(everything) == head == len(streams)
        for stream_id in ("stream-a", "stream-b", "stream-c", "stream-none"):
            for after, limit in [(0, 100), (0, 3), (5, 2), (head - 1, 10), (head, 10)]:
                expected = [r for r in everything if r[1] == stream_id and r[3] > after][:limit]
                assert await store.read_stream_rows_after(stream_id, after, limit) == (
                    expected,
                    head,
                ), (stream_id, after, limit)
    finally:
        await store.close()


def set_stored_data(url: str, position: int, data: bytes) -> None:
    """The payload of the stored event at ``position`` replaced, as a damaged row or a
    hand edit leaves it."""
    path = sqlite_path(url)
    if path is not None:
        with closing(sqlite3.connect(path)) as connection, connection:
            connection.execute("UPDATE events SET data = ? WHERE position = ?", (data, position))
        return
    with psycopg.connect(url, autocommit=True) as database:
        database.execute("UPDATE events SET data = %s WHERE position = %s", (data, position))


async def failed_call(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value


def logged_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages of the exceptions logged (the unexpected errors calls ended on)."""
    return [
        str(record.exc_info[1])
        for record in caplog.records
        if record.exc_info is not None and record.exc_info[1] is not None
    ]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"order_id": broken', id="not-json"),
        pytest.param(b'{"order_id": 5}', id="not-its-type"),
    ],
)
async def test_an_event_that_does_not_decode_is_internal_and_named_in_the_log_by_position(
    store_url: str, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # The log had only the JSON parser's error ("expected value at line 1 column 15") or
    # pydantic's, which named no event: nothing told where the store was damaged.
    async with running_gateway(await open_store(store_url)) as gateway, connect(gateway) as clients:
        restocked = (await clients.restock("sku-1", 5))[0]
        created = (await clients.create(order_request(item("sku-1"))))[0]
    for event in (restocked, created):
        set_stored_data(store_url, event.position, data)

    caplog.set_level(logging.ERROR)
    async with running_gateway(await open_store(store_url)) as gateway, connect(gateway) as clients:
        # The order is loaded from its events as records; the product from its snapshot
        # (none yet) and the payloads after it; Subscribe catches up from the start.
        cancel = await failed_call(clients.cancel(created.order_created.order_id))
        restock = await failed_call(clients.restock("sku-1", 1))
        subscription = StreamReader.open(clients, after_position=0)
        assert await subscription.status() == grpc.StatusCode.INTERNAL
        assert subscription.events == []
    for refused in (cancel, restock):
        assert (refused.code(), refused.details()) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    logged = logged_errors(caplog)
    # The cancel names the order's event; the restock and the subscription the product's.
    for event, times in ((created, 1), (restocked, 2)):
        named = (
            f"the stored event at position {event.position} ({event.event_type} of"
            f" {event.stream_id}) cannot be read ("
        )
        assert sum(named in message for message in logged) == times, logged


async def test_a_catch_up_delivers_every_event_before_a_row_that_cannot_be_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A read of a page that meets a row whose text is not UTF-8 fails at that row: the
    rows before it in the page are delivered first. Failing the whole page withheld them,
    and a subscriber resuming after the position the log names skipped them."""
    url = f"sqlite:///{tmp_path / 'damaged.db'}"
    async with running_gateway(await open_store(url)) as gateway, connect(gateway) as clients:
        for _ in range(5):
            await clients.restock("sku-1", 1)
    with closing(sqlite3.connect(tmp_path / "damaged.db")) as connection, connection:
        connection.execute(
            "UPDATE events SET correlation_id = CAST(X'c328ff' AS TEXT) WHERE position = 4"
        )
    caplog.set_level(logging.ERROR)
    async with running_gateway(await open_store(url)) as gateway, connect(gateway) as clients:
        subscription = StreamReader.open(clients, after_position=0)
        assert await subscription.status() == grpc.StatusCode.INTERNAL
    assert [event.position for event in subscription.events] == [1, 2, 3]
    assert any(
        "the stored event at position 4 cannot be read" in message
        for message in logged_errors(caplog)
    )
