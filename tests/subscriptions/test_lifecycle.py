"""Subscribe's edges: bad requests, limits, cancellation, deadlines, shutdown, store failures."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from orders.v1 import consumer_group_service_pb2 as groups_pb
from orders.v1 import consumer_group_service_pb2_grpc as groups_grpc
from orders.v1 import event_stream_service_pb2

from domain.errors import StoreUnavailableError
from domain.ports import RecordedEvent
from server.app import Gateway
from server.rpc.subscription_hub import HubTuning
from tests.clients import Clients, detail, item, order_request
from tests.group_support import group_gateway, member
from tests.serving import free_port, start_gateway, wait_until_serving
from tests.subscription_support import (
    SMALL_WINDOW,
    WAIT,
    StreamReader,
    WrappedStore,
    clients_on,
    connect,
    identities,
    run_writers,
    running_gateway,
    stored,
    until,
)

QUICK = HubTuning(poll_interval=0.05, checkpoint_interval=0.5, stop_timeout=0.2)


class FlakyStore(WrappedStore):
    """A memory store whose reads can be made to fail and whose wake-ups can be lost."""

    def __init__(self, wake_ups: bool = True) -> None:
        super().__init__()
        self.failing = False
        self.wake_ups = wake_ups

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        if self.failing:
            raise StoreUnavailableError("the test took the store down")
        return await super().read_all(after_position, limit)

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        if self.wake_ups:
            super().add_commit_listener(listener)


async def until_no_subscribers(gateway: Gateway) -> None:
    await until(lambda: gateway.hub.subscriber_count == 0)


async def test_unknown_event_type_is_invalid_argument_naming_it(clients: Clients) -> None:
    reader = StreamReader.open(clients, event_types=["OrderCreated", "OrderShipped", "Nope"])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reader.next()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = detail(raised.value, error_details_pb2.BadRequest)
    assert [v.field for v in bad_request.field_violations] == ["event_types[1]", "event_types[2]"]
    assert "OrderShipped" in bad_request.field_violations[0].description


async def test_a_very_long_unknown_event_type_is_invalid_argument_all_the_same(
    clients: Clients,
) -> None:
    # Quoted whole, it made trailers over grpc's limits: RESOURCE_EXHAUSTED at the client.
    reader = StreamReader.open(clients, event_types=["x" * 20_000])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reader.next()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = detail(raised.value, error_details_pb2.BadRequest)
    (violation,) = bad_request.field_violations
    assert violation.field == "event_types[0]"
    assert violation.description.startswith("unknown event type 'xxx")
    assert len(violation.description) <= 512


@pytest.mark.parametrize(
    "stream_id",
    ["sku-1", "order-42", "product-", "product-a b", "Product-sku-1", "order-", "product-sku-1\n"],
)
async def test_a_stream_id_no_stream_can_have_is_invalid_argument(
    clients: Clients, stream_id: str
) -> None:
    reader = StreamReader.open(clients, stream_id=stream_id, event_types=["Nope"])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reader.next()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = detail(raised.value, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad_request.field_violations][1:] == [
        ("stream_id", "must be order-<order UUID> or product-<product_id>")
    ]


async def test_an_order_stream_named_in_capitals_is_the_orders_stream(clients: Clients) -> None:
    await clients.restock("sku-1", 5)
    (created, _) = await clients.create(order_request(item("sku-1")))
    order_id = created.order_created.order_id
    reader = StreamReader.open(clients, stream_id=f"order-{order_id.upper()}")
    (event,) = await reader.through(created.position)
    assert (event.event_id, event.stream_id) == (created.event_id, f"order-{order_id}")
    reader.call.cancel()


async def test_subscribers_beyond_the_limit_are_resource_exhausted() -> None:
    async with running_gateway(max_subscribers=2) as gateway, connect(gateway) as clients:
        first = StreamReader.open(clients)
        second = StreamReader.open(clients)
        await first.next_checkpoint()
        await second.next_checkpoint()

        third = StreamReader.open(clients)
        assert await third.status() == grpc.StatusCode.RESOURCE_EXHAUSTED

        first.call.cancel()
        await until(lambda: gateway.hub.subscriber_count == 1)
        fourth = StreamReader.open(clients)
        assert await fourth.next_checkpoint() == 0, "a freed slot can be used again"
        second.call.cancel()
        fourth.call.cancel()


async def test_consumer_groups_reading_the_log_take_no_subscriber_slot() -> None:
    # ORDER_GATEWAY_MAX_SUBSCRIBERS bounds Subscribe streams. A group's own reading of the
    # log is not one: it must neither take a client's slot nor stall when they are taken.
    async with group_gateway(max_subscribers=1) as gateway, connect(gateway) as clients:
        groups = groups_grpc.ConsumerGroupServiceStub(clients.channel)
        await groups.CreateConsumerGroup(groups_pb.CreateConsumerGroupRequest(name="g"))
        await clients.restock("sku-1", 1)
        async with member(groups, "g") as consumer:
            assert (await consumer.delivery()).event.position == 1

            subscriber = StreamReader.open(clients)
            assert await subscriber.next_checkpoint() == 1
            beyond = StreamReader.open(clients)
            assert await beyond.status() == grpc.StatusCode.RESOURCE_EXHAUSTED

            await clients.restock("sku-2", 1)
            assert (await consumer.delivery()).event.position == 2
            assert [e.position for e in await subscriber.through(2)] == [1, 2]
            subscriber.call.cancel()

        # And with every slot taken by Subscribe streams, a group still delivers.
        subscriber = StreamReader.open(clients)
        await subscriber.next_checkpoint()
        await groups.CreateConsumerGroup(groups_pb.CreateConsumerGroupRequest(name="h"))
        async with member(groups, "h") as consumer:
            assert sorted(d.event.position for d in await consumer.deliveries(2)) == [1, 2]
        subscriber.call.cancel()


async def test_client_cancellation_releases_the_subscription(
    gateway: Gateway, clients: Clients
) -> None:
    await clients.restock("sku-1", 1)
    readers = [StreamReader.open(clients) for _ in range(3)]
    for reader in readers:
        await reader.next_checkpoint()
    assert gateway.hub.subscriber_count == 3
    for reader in readers:
        reader.call.cancel()
    await until_no_subscribers(gateway)
    # The gateway keeps serving: commands and new subscriptions work.
    await clients.restock("sku-2", 1)
    again = StreamReader.open(clients)
    assert [e.position for e in await again.through(2)] == [1, 2]
    again.call.cancel()


async def test_deadline_ends_the_stream_and_releases_the_subscription(
    gateway: Gateway, clients: Clients
) -> None:
    call = clients.events.Subscribe(event_stream_service_pb2.SubscribeRequest(), timeout=0.3)
    reader = StreamReader(call)
    assert await reader.status() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert reader.checkpoints == [0]
    await until_no_subscribers(gateway)


async def test_shutdown_ends_every_stream_even_one_whose_client_stopped_reading() -> None:
    # The grace only bounds how long grpc tries to flush what the stalled client never
    # reads; the subscription itself is ended by the hub before that.
    async with (
        running_gateway(tuning=QUICK, shutdown_grace=0.5) as gateway,
        connect(gateway) as clients,
        connect(gateway, SMALL_WINDOW) as stalled_clients,
    ):
        live = StreamReader.open(clients)
        stalled = StreamReader.open(stalled_clients)
        await live.next_checkpoint()
        await stalled.next_checkpoint()
        # Enough events that the stalled stream's server side is stuck sending.
        await run_writers(clients, writers=2, orders=300)

        async with asyncio.timeout(WAIT):
            await gateway.stop()

        assert await live.status() == grpc.StatusCode.UNAVAILABLE
        assert await stalled.status() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
        assert gateway.hub.subscriber_count == 0


async def test_a_subscriber_that_stopped_reading_does_not_hold_a_stop_for_its_grace() -> None:
    """Its stream is ended, but the end cannot reach it behind the events it has not read:
    a stop that waited for it would take the whole grace on every deploy."""
    async with (
        running_gateway(tuning=QUICK, shutdown_grace=5) as gateway,
        connect(gateway) as clients,
        connect(gateway, SMALL_WINDOW) as stalled_clients,
    ):
        stalled = StreamReader.open(stalled_clients)
        await stalled.next_checkpoint()
        # Enough events that the stalled stream's server side is stuck sending.
        await run_writers(clients, writers=2, orders=300)

        started = time.monotonic()
        async with asyncio.timeout(WAIT):
            await gateway.stop()
        took = time.monotonic() - started

        # Half the grace: a stop that waited for the stalled stream took all of it.
        assert took < 2.5, f"the stop took {took:.1f} s"
        assert await stalled.status() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


async def test_a_stop_ends_open_streams_at_once_as_the_server_shutting_down() -> None:
    """Open Subscribe streams never end on their own: a stop that waited for them would
    take its whole grace on every deploy. They end at once, with a status telling their
    clients to reconnect elsewhere."""
    async with running_gateway(shutdown_grace=5) as gateway, connect(gateway) as clients:
        reader = StreamReader.open(clients)
        assert await reader.next_checkpoint() == 0

        started = time.monotonic()
        async with asyncio.timeout(WAIT):
            await gateway.stop()
        took = time.monotonic() - started

        # Half the grace: a stop that waited on the stream would have taken all of it.
        assert took < 2.5, f"the stop took {took:.1f} s"
        assert await reader.status() == grpc.StatusCode.UNAVAILABLE
        assert await reader.call.details() == "the server is shutting down"


async def test_subscribing_while_shutting_down_is_unavailable() -> None:
    async with running_gateway(tuning=QUICK) as gateway, connect(gateway) as clients:
        await gateway.hub.stop()
        late = StreamReader.open(clients)
        assert await late.status() == grpc.StatusCode.UNAVAILABLE


async def test_store_failure_during_catch_up_is_unavailable() -> None:
    store = FlakyStore()
    async with running_gateway(store=store, tuning=QUICK) as gateway, connect(gateway) as clients:
        await clients.restock("sku-1", 1)
        store.failing = True
        reader = StreamReader.open(clients)
        assert await reader.status() == grpc.StatusCode.UNAVAILABLE
        await until_no_subscribers(gateway)


async def test_live_subscribers_lose_nothing_while_the_hub_cannot_read() -> None:
    store = FlakyStore()
    async with running_gateway(store=store, tuning=QUICK) as gateway, connect(gateway) as clients:
        reader = StreamReader.open(clients)
        await reader.next_checkpoint()
        store.failing = True
        await run_writers(clients, writers=2, orders=5)
        await asyncio.sleep(0.2)  # a few failed hub reads (polls and wake-ups)
        store.failing = False
        head = await store.head_position()
        assert identities(await reader.through(head)) == await stored(store)
        reader.call.cancel()


async def test_lost_wake_ups_only_delay_delivery() -> None:
    store = FlakyStore(wake_ups=False)
    async with running_gateway(store=store, tuning=QUICK) as gateway, connect(gateway) as clients:
        reader = StreamReader.open(clients)
        await reader.next_checkpoint()
        await run_writers(clients, writers=2, orders=5)
        head = await store.head_position()
        assert identities(await reader.through(head)) == await stored(store)
        reader.call.cancel()


async def test_sigterm_ends_open_subscriptions_and_the_process_exits_0(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    # A short grace: it only bounds grpc's attempt to flush what the stalled client
    # never reads, after the subscriptions themselves have ended.
    process = start_gateway(
        ["serve", "--listen", target, "--store", f"sqlite:///{tmp_path}/events.db"],
        env={**os.environ, "ORDER_GATEWAY_SHUTDOWN_GRACE": "1"},
    )
    try:
        await wait_until_serving(target, process)
        async with (
            grpc.aio.insecure_channel(target) as channel,
            grpc.aio.insecure_channel(target, SMALL_WINDOW) as stalled_channel,
        ):
            clients = clients_on(channel)
            live = StreamReader.open(clients)
            stalled = StreamReader.open(clients_on(stalled_channel))
            await live.next_checkpoint()
            await stalled.next_checkpoint()
            # Far more than the stalled client's window: its stream is stuck sending.
            await run_writers(clients, writers=4, orders=150)

            process.send_signal(signal.SIGTERM)
            assert await live.status() == grpc.StatusCode.UNAVAILABLE
            assert await asyncio.to_thread(process.wait, WAIT) == 0
            assert await stalled.status() in {
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
            }
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
