"""End-to-end over gRPC against a real server on 127.0.0.1:0: every RPC and error row."""

from __future__ import annotations

import asyncio
import logging
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2

from domain.errors import ConcurrencyConflictError
from domain.ports import Commit, RecordedEvent
from server.app import create_server
from server.config import Settings
from server.stores.memory import MemoryEventStore
from tests.clients import Clients, bad_fields, detail, item, money, order_request
from tests.subscription_support import connect, running_gateway


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value


async def placed(clients: Clients, *items: tuple[str, int]) -> str:
    events = await clients.create(order_request(*(item(p, q) for p, q in items)))
    return events[0].order_created.order_id


async def test_restock_streams_product_restocked(clients: Clients) -> None:
    first = await clients.restock("sku.1_A-b", 5)
    second = await clients.restock("sku.1_A-b", 7)
    assert [e.product_restocked.available_after for e in first + second] == [5, 12]
    assert (second[0].stream_id, second[0].stream_version, second[0].position) == (
        "product-sku.1_A-b",
        2,
        2,
    )
    uuid.UUID(second[0].event_id)
    assert second[0].occurred_at.seconds > 0


async def test_create_order_streams_created_then_one_reservation_per_item(
    clients: Clients,
) -> None:
    await clients.restock("a", 10)
    await clients.restock("b", 10)
    customer = str(uuid.uuid4()).upper()
    request = order_request(
        item("b", 2, money(3, 250_000_000)), item("a", 1, money(10)), customer_id=customer
    )
    events = await clients.create(request)

    assert [e.event_type for e in events] == ["OrderCreated", "StockReserved", "StockReserved"]
    created = events[0].order_created
    assert created.customer_id == customer.lower()
    assert (created.total.currency_code, created.total.units, created.total.nanos) == (
        "EUR",
        16,
        500_000_000,
    )
    assert events[0].stream_id == f"order-{created.order_id}"
    assert uuid.UUID(created.order_id).version == 7  # time-ordered: see domain/ids.py
    assert [
        (e.stock_reserved.product_id, e.stock_reserved.available_after) for e in events[1:]
    ] == [
        ("b", 8),
        ("a", 9),
    ]
    assert [e.position for e in events] == [3, 4, 5]
    assert len({e.event_id for e in events}) == 3


async def test_cancel_order_streams_cancelled_then_releases(clients: Clients) -> None:
    await clients.restock("a", 3)
    order_id = await placed(clients, ("a", 2))
    events = await clients.cancel(order_id, reason="changed my mind")
    assert [e.event_type for e in events] == ["OrderCancelled", "StockReleased"]
    assert events[0].order_cancelled.reason == "changed my mind"
    assert events[0].order_cancelled.cancelled_by == ""
    assert events[1].stock_released.available_after == 3
    assert events[0].stream_version == 2


async def test_command_and_correlation_ids(clients: Clients) -> None:
    command_id = str(uuid.uuid4())
    events = await clients.restock("a", 1, command_id=command_id)
    assert (events[0].command_id, events[0].correlation_id) == (command_id, command_id)
    events = await clients.restock("a", 1, metadata=(("x-correlation-id", "checkout-42"),))
    assert events[0].correlation_id == "checkout-42"
    uuid.UUID(events[0].command_id)
    # A blank header is no correlation id: the command's id correlates, as without one.
    another = str(uuid.uuid4())
    events = await clients.restock(
        "a", 1, command_id=another, metadata=(("x-correlation-id", "   "),)
    )
    assert (events[0].command_id, events[0].correlation_id) == (another, another)


async def test_invalid_argument_names_every_bad_field(clients: Clients) -> None:
    request = order_request(item("a", 0), item("a b", 1, money(1, currency="usd")))
    request.customer_id = "not-a-uuid"
    request.shipping_address.city = "  "
    error = await rpc_error(clients.create(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(bad_fields(error)) == sorted(
        [
            "customer_id",
            "items[0].quantity",
            "items[1].product_id",
            "items[1].unit_price.currency_code",
            "shipping_address.city",
        ]
    )


async def test_missing_messages_are_reported_by_path(clients: Clients) -> None:
    request = order_request(item("a", 1))
    request.items[0].ClearField("unit_price")
    request.ClearField("shipping_address")
    error = await rpc_error(clients.create(request))
    assert sorted(bad_fields(error)) == ["items[0].unit_price", "shipping_address"]


UNPARSEABLE = b"\xff\xff\xff\xff\x0f"


@pytest.mark.parametrize(
    "method",
    [
        "/orders.v1.OrderCommandService/CreateOrder",
        "/orders.v1.EventStreamService/Subscribe",
        # Its first message, which must be a join: not parsed, it is no join either.
        "/orders.v1.ConsumerGroupService/Consume",
        # Open to callers without credentials: grpc's own services, too.
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ],
)
async def test_unparseable_request_bytes_are_invalid_argument_on_every_method(
    clients: Clients, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Sent as a stream of one message, which any method kind reads.
    call: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = clients.channel.stream_stream(
        method, request_serializer=None, response_deserializer=None
    )
    error = await rpc_error(_drain(call(iter([UNPARSEABLE]))))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "request message could not be parsed",
    )
    # The client's mistake, not a fault of the server's: no traceback logged.
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert (await clients.restock("still-serving", 1))[0].position == 1


async def _drain(call: grpc.aio.UnaryStreamCall | grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
    async for _ in call:
        pass


async def test_unknown_product_is_not_found_with_error_info(clients: Clients) -> None:
    error = await rpc_error(clients.create(order_request(item("ghost", 1))))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    info = detail(error, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain, info.metadata["product_id"]) == (
        "PRODUCT_NOT_FOUND",
        "order-gateway",
        "ghost",
    )


async def test_unknown_order_is_not_found_with_error_info(clients: Clients) -> None:
    error = await rpc_error(clients.cancel(str(uuid.uuid4())))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    info = detail(error, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("ORDER_NOT_FOUND", "order-gateway")


async def test_insufficient_stock_has_precondition_failure_and_error_info(
    clients: Clients,
) -> None:
    await clients.restock("a", 2)
    await clients.restock("b", 9)
    error = await rpc_error(clients.create(order_request(item("a", 3), item("b", 1))))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    failure = detail(error, error_details_pb2.PreconditionFailure)
    assert [(v.type, v.subject, v.description) for v in failure.violations] == [
        ("STOCK", "product-a", "requested 3, available 2")
    ]
    info = detail(error, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("INSUFFICIENT_INVENTORY", "order-gateway")


async def test_an_order_short_of_every_one_of_its_100_products_reaches_the_client_as_such(
    clients: Clients,
) -> None:
    # 100 shortages of 64-character product ids: 15 KiB of trailers, which gRPC clients
    # refuse (RESOURCE_EXHAUSTED) by default. The first shortages are reported.
    products = [f"{n:03d}".ljust(64, "p") for n in range(100)]
    for product_id in products:
        await clients.restock(product_id, 1)
    error = await rpc_error(clients.create(order_request(*(item(p, 2) for p in products))))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    failure = detail(error, error_details_pb2.PreconditionFailure)
    subjects = [v.subject for v in failure.violations]
    assert 10 <= len(subjects) < 100
    assert subjects == [f"product-{p}" for p in products[: len(subjects)]]
    info = detail(error, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("INSUFFICIENT_INVENTORY", "order-gateway")
    assert len(error.details() or "") <= 1024


async def test_cancelling_twice_is_failed_precondition(clients: Clients) -> None:
    await clients.restock("a", 1)
    order_id = await placed(clients, ("a", 1))
    await clients.cancel(order_id)
    error = await rpc_error(clients.cancel(order_id))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert detail(error, error_details_pb2.ErrorInfo).reason == "ORDER_ALREADY_CANCELLED"


async def test_retry_with_same_command_id_replays_same_events(clients: Clients) -> None:
    await clients.restock("a", 5)
    request = order_request(item("a", 2), command_id=str(uuid.uuid4()))
    first = await clients.create(request)
    again = await clients.create(request)
    assert again == first
    restocked = await clients.restock("a", 1)
    assert restocked[0].position == first[-1].position + 1
    assert restocked[0].product_restocked.available_after == 4


async def test_a_retry_through_another_replica_among_orders_on_one_product_replays() -> None:
    """Replica B never committed the id, so it runs the retry, which the store refuses as a
    duplicate; an order B decided behind it on the product's queued state follows a commit
    that never happens and is decided again. The retry replays, and no order fails."""
    store = MemoryEventStore()
    async with (
        running_gateway(store) as replica_a,
        running_gateway(store) as replica_b,
        connect(replica_a) as via_a,
        connect(replica_b) as via_b,
    ):
        await via_a.restock("hot", 50)
        request = order_request(item("hot", 1), command_id=str(uuid.uuid4()))
        first = await via_a.create(request)
        others = [order_request(item("hot", 1)) for _ in range(20)]

        results = await asyncio.gather(
            *(via_b.create(other) for other in others[:10]),
            via_b.create(request),
            *(via_b.create(other) for other in others[10:]),
        )

    assert results[10] == first
    placed = results[:10] + results[11:]
    assert sorted(r[1].stock_reserved.available_after for r in placed) == list(range(29, 49))


async def test_replay_comes_before_business_rules(clients: Clients) -> None:
    await clients.restock("a", 1)
    order_id = await placed(clients, ("a", 1))
    command_id = str(uuid.uuid4())
    first = await clients.cancel(order_id, command_id=command_id)
    assert await clients.cancel(order_id, command_id=command_id) == first


async def test_validation_comes_before_replay(clients: Clients) -> None:
    command_id = str(uuid.uuid4())
    await clients.restock("a", 1, command_id=command_id)
    error = await rpc_error(clients.restock("a", 0, command_id=command_id))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_reused_command_id_is_already_exists(clients: Clients) -> None:
    command_id = str(uuid.uuid4())
    await clients.restock("a", 1, command_id=command_id)
    for call in (
        clients.restock("a", 2, command_id=command_id),
        clients.create(order_request(item("a", 1), command_id=command_id)),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        info = detail(error, error_details_pb2.ErrorInfo)
        assert (info.reason, info.domain) == ("COMMAND_ID_REUSED", "order-gateway")


async def test_a_cancel_reusing_its_command_id_with_another_reason_is_already_exists(
    clients: Clients,
) -> None:
    """The reason is recorded in OrderCancelled: a cancel with another one is another
    request, and replaying the first would tell its caller a reason it never gave."""
    await clients.restock("a", 1)
    order_id = await placed(clients, ("a", 1))
    command_id = str(uuid.uuid4())
    first = await clients.cancel(order_id, reason="ordered twice", command_id=command_id)
    assert first[0].order_cancelled.reason == "ordered twice"

    error = await rpc_error(clients.cancel(order_id, reason="too slow", command_id=command_id))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    info = detail(error, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("COMMAND_ID_REUSED", "order-gateway")
    # The same request still replays.
    retried = await clients.cancel(order_id, reason="ordered twice", command_id=command_id)
    assert retried == first


async def test_concurrent_orders_never_oversell(clients: Clients) -> None:
    await clients.restock("hot", 20)
    results = await asyncio.gather(
        *(clients.create(order_request(item("hot", 1))) for _ in range(100)),
        return_exceptions=True,
    )
    succeeded = [r for r in results if isinstance(r, list)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(succeeded) == 20
    assert {e.code() for e in refused} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert len(refused) == 80
    remaining = sorted(r[1].stock_reserved.available_after for r in succeeded)
    assert remaining == list(range(20))


class AlwaysConflictingStore(MemoryEventStore):
    async def append(self, commit: Commit) -> list[RecordedEvent]:
        raise ConcurrencyConflictError("another replica keeps winning")


async def test_conflict_left_after_retries_is_aborted() -> None:
    gateway = await create_server(
        Settings(listen="127.0.0.1:0", store="memory://"), store=AlwaysConflictingStore()
    )
    await gateway.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            from orders.v1 import inventory_command_service_pb2, inventory_command_service_pb2_grpc

            stub = inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel)
            call = stub.RestockProduct(
                inventory_command_service_pb2.RestockProductRequest(product_id="a", quantity=1)
            )
            error = await rpc_error(_drain(call))
    finally:
        await gateway.stop()
    assert error.code() == grpc.StatusCode.ABORTED
    info = detail(error, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("CONCURRENCY_CONFLICT", "order-gateway")
