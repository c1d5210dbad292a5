"""Prometheus metrics, scraped over HTTP from a real gateway after real calls."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
from orders.v1 import consumer_group_service_pb2 as groups_pb
from orders.v1 import consumer_group_service_pb2_grpc as groups_grpc
from orders.v1 import event_stream_service_pb2
from prometheus_client.parser import text_string_to_metric_families

from domain.commands import Command, RestockProduct
from domain.ports import Commit, RecordedEvent
from server.app import Gateway
from server.observability.metrics import CommandMetricsMiddleware, GatewayMetrics, MeteredEventStore
from server.rpc.subscription_hub import HubTuning
from server.stores.memory import MemoryEventStore
from tests.clients import item, order_request
from tests.conformance.contract import commit_of
from tests.group_support import member
from tests.observability_support import rpc_error, running
from tests.serving import listening_stranger
from tests.subscription_support import StreamReader, connect, running_gateway

INVENTORY = "orders.v1.InventoryCommandService"
ORDERS = "orders.v1.OrderCommandService"
EVENTS = "orders.v1.EventStreamService"


async def scrape(gateway: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample at /metrics, keyed by (name, labels)."""
    assert gateway.metrics_port is not None
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            return str(response.read().decode())

    text = await asyncio.to_thread(fetch)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape_once_counted(
    gateway: Gateway, name: str, labels: frozenset[tuple[str, str]]
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``scrape``, once the sample ``(name, labels)`` is there.

    An aborted call's status reaches the client from inside ``abort()``, a moment before
    the handler's exception unwinds through the interceptor that counts the call.
    """
    deadline = asyncio.get_running_loop().time() + 10
    while (name, labels) not in (samples := await scrape(gateway)):
        assert asyncio.get_running_loop().time() < deadline, f"{name} {labels} never counted"
        await asyncio.sleep(0.02)
    return samples


def rpc_labels(service: str, method: str, **extra: str) -> frozenset[tuple[str, str]]:
    return frozenset(
        {
            "grpc_service": service,
            "grpc_method": method,
            "grpc_type": "server_stream",
            **extra,
        }.items()
    )


async def test_scrape_counts_rpcs_by_code_and_times_commands_and_appends() -> None:
    async with running(metrics_listen="127.0.0.1:0") as (gateway, clients):
        await clients.restock("sku-1", 5)
        await clients.create(order_request(item("sku-1", 2)))
        unknown = await rpc_error(clients.create(order_request(item("no-such-sku", 1))))
        invalid = await rpc_error(clients.restock("sku-1", 0))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT

        handled = "grpc_server_handled_total"
        samples = await scrape_once_counted(
            gateway, handled, rpc_labels(INVENTORY, "RestockProduct", grpc_code="INVALID_ARGUMENT")
        )

    assert samples[(handled, rpc_labels(INVENTORY, "RestockProduct", grpc_code="OK"))] == 1
    assert (
        samples[(handled, rpc_labels(INVENTORY, "RestockProduct", grpc_code="INVALID_ARGUMENT"))]
        == 1
    )
    assert samples[(handled, rpc_labels(ORDERS, "CreateOrder", grpc_code="OK"))] == 1
    assert samples[(handled, rpc_labels(ORDERS, "CreateOrder", grpc_code="NOT_FOUND"))] == 1
    assert samples[("grpc_server_handling_seconds_count", rpc_labels(ORDERS, "CreateOrder"))] == 2
    assert samples[("grpc_server_handling_seconds_sum", rpc_labels(ORDERS, "CreateOrder"))] > 0

    def command(name: str, outcome: str) -> float:
        labels = frozenset({"command": name, "outcome": outcome}.items())
        return samples[("order_gateway_command_seconds_count", labels)]

    assert command("RestockProduct", "ok") == 1
    assert command("CreateOrder", "ok") == 1
    assert command("CreateOrder", "PRODUCT_NOT_FOUND") == 1

    # Two commits: the restock (1 event) and the order (OrderCreated + StockReserved).
    ok = frozenset({("outcome", "ok")})
    assert samples[("order_gateway_store_append_seconds_count", ok)] == 2
    assert samples[("order_gateway_store_append_events_count", frozenset())] == 2
    assert samples[("order_gateway_store_append_events_sum", frozenset())] == 3
    assert samples[("order_gateway_store_append_events_bucket", frozenset({("le", "1.0")}))] == 1


async def test_calls_refused_by_authentication_are_counted() -> None:
    async with running(secured=True, metrics_listen="127.0.0.1:0") as (gateway, clients):
        error = await rpc_error(clients.restock("sku-1", 5))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        labels = rpc_labels(INVENTORY, "RestockProduct", grpc_code="UNAUTHENTICATED")
        samples = await scrape_once_counted(gateway, "grpc_server_handled_total", labels)
    assert samples[("grpc_server_handled_total", labels)] == 1


async def test_the_subscriptions_gauge_counts_subscribe_streams_not_consumer_groups() -> None:
    async with running(metrics_listen="127.0.0.1:0") as (gateway, clients):
        groups = groups_grpc.ConsumerGroupServiceStub(clients.channel)
        await groups.CreateConsumerGroup(groups_pb.CreateConsumerGroupRequest(name="g"))
        await clients.restock("sku-1", 5)
        async with member(groups, "g") as consumer:
            await consumer.delivery()
            samples = await scrape(gateway)
            assert samples[("order_gateway_consumer_group_members", frozenset({("group", "g")}))]
            assert samples[("order_gateway_subscriptions", frozenset())] == 0


async def test_a_scrape_reports_a_group_nobody_consumes_from_the_store() -> None:
    async with running(metrics_listen="127.0.0.1:0") as (gateway, clients):
        groups = groups_grpc.ConsumerGroupServiceStub(clients.channel)
        await groups.CreateConsumerGroup(groups_pb.CreateConsumerGroupRequest(name="g"))
        await clients.restock("sku-1", 5)
        # The first scrape waits for the store's figures: no member was ever connected.
        samples = await scrape(gateway)
    group = frozenset({("group", "g")})
    assert samples[("order_gateway_consumer_group_lag_events", group)] == 1
    assert samples[("order_gateway_consumer_group_parked", group)] == 0
    assert samples[("order_gateway_consumer_group_members", group)] == 0
    assert samples[("order_gateway_consumer_group_in_flight", group)] == 0


async def test_open_subscriptions_are_a_gauge_and_lag_is_exposed() -> None:
    async with running(metrics_listen="127.0.0.1:0") as (gateway, clients):
        await clients.restock("sku-1", 5)
        call = clients.events.Subscribe(event_stream_service_pb2.SubscribeRequest())
        first = await call.read()
        assert isinstance(first, event_stream_service_pb2.SubscribeResponse)
        assert first.event.event_type == "ProductRestocked"
        assert (await scrape(gateway))[("order_gateway_subscriptions", frozenset())] == 1

        call.cancel()
        deadline = asyncio.get_running_loop().time() + 10
        while (await scrape(gateway))[("order_gateway_subscriptions", frozenset())] != 0:
            assert asyncio.get_running_loop().time() < deadline, "subscription never closed"
            await asyncio.sleep(0.05)
        samples = await scrape(gateway)

    # The subscription reported its progress (its catch-up page, at least) as a lag.
    assert samples[("order_gateway_subscription_lag_events_count", frozenset())] >= 1
    labels = rpc_labels(EVENTS, "Subscribe", grpc_code="CANCELLED")
    assert samples[("grpc_server_handled_total", labels)] == 1


async def test_each_gateway_counts_only_its_own_calls() -> None:
    async with (
        running(metrics_listen="127.0.0.1:0") as (busy, busy_clients),
        running(metrics_listen="127.0.0.1:0") as (idle, _),
    ):
        await busy_clients.restock("sku-1", 5)
        busy_samples = await scrape(busy)
        idle_samples = await scrape(idle)
    labels = rpc_labels(INVENTORY, "RestockProduct", grpc_code="OK")
    assert busy_samples[("grpc_server_handled_total", labels)] == 1
    assert ("grpc_server_handled_total", labels) not in idle_samples


async def test_metrics_endpoint_closes_with_the_gateway() -> None:
    async with running(metrics_listen="127.0.0.1:0") as (gateway, _):
        port = gateway.metrics_port
        await scrape(gateway)
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(
            urllib.request.urlopen, f"http://127.0.0.1:{port}/metrics", timeout=5
        )


async def test_no_metrics_server_without_metrics_listen() -> None:
    async with running() as (gateway, clients):
        await clients.restock("sku-1", 5)
        assert gateway.metrics_port is None


async def test_subscription_lag_is_head_minus_delivered_never_negative() -> None:
    async with running(metrics_listen="127.0.0.1:0") as (gateway, _):
        gateway.metrics.subscription_lag(head_position=10, delivered_position=7)
        gateway.metrics.subscription_lag(head_position=5, delivered_position=9)
        samples = await scrape(gateway)
    assert samples[("order_gateway_subscription_lag_events_count", frozenset())] == 2
    assert samples[("order_gateway_subscription_lag_events_sum", frozenset())] == 3
    assert (
        samples[("order_gateway_subscription_lag_events_bucket", frozenset({("le", "0.0")}))] == 1
    )


def test_a_taken_metrics_address_is_named_in_the_error() -> None:
    with listening_stranger() as metrics:
        serve = ("serve", "--listen", "127.0.0.1:0", "--metrics-listen", metrics)
        refused = subprocess.run(
            [sys.executable, "-m", "server.cli", *serve, "--store", "memory://"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert refused.returncode == 2
    assert refused.stderr.endswith(
        f"order-gateway: cannot serve metrics on {metrics}: Address already in use\n"
    )


async def test_a_subscriber_catching_up_far_behind_shows_its_lag() -> None:
    """Nobody is live, so the hub's own reader has not read the events committed since
    the gateway started: the lag is measured against the committed head, not against it."""
    store = MemoryEventStore()
    async with (
        running_gateway(store, HubTuning(page_size=100), metrics_listen="127.0.0.1:0") as gateway,
        connect(gateway) as clients,
    ):
        for _ in range(300):
            await clients.restock("p", 1)
        reader = StreamReader.open(clients)
        await reader.next_checkpoint()  # caught up: three pages, the first two full
        samples = await scrape(gateway)
        reader.call.cancel()
    lag = samples[("order_gateway_subscription_lag_events_sum", frozenset())]
    # After the first page 200 events were left, after the second 100.
    assert lag >= 300


class _AppendsAfterTheCallerLeft(MemoryEventStore):
    """Commits, then answers only once its caller has stopped waiting (a deadline)."""

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        await super().append(commit)
        await asyncio.Event().wait()
        raise AssertionError("never answered")


async def test_a_command_whose_caller_left_is_counted_cancelled_not_as_an_error() -> None:
    # Counted as outcome "error", a client's deadline read as a gateway fault in the
    # dashboards (and such appends, committed or not, are no committed append's size).
    metrics = GatewayMetrics()
    store = MeteredEventStore(_AppendsAfterTheCallerLeft(), metrics)
    restock = RestockProduct(product_id="sku-1", quantity=1)

    async def dispatch(command: Command) -> list[RecordedEvent]:
        return await store.append(commit_of([("product-sku-1", 1)], command_id=command.command_id))

    call = asyncio.create_task(CommandMetricsMiddleware(metrics)(restock, dispatch))
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    def count(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    labels = {"command": "RestockProduct"}
    assert count("order_gateway_command_seconds_count", **labels, outcome="cancelled") == 1
    assert count("order_gateway_command_seconds_count", **labels, outcome="error") is None
    assert count("order_gateway_store_append_seconds_count", outcome="cancelled") == 1
    assert count("order_gateway_store_append_seconds_count", outcome="error") is None
    assert count("order_gateway_store_append_events_count") == 0


@pytest.mark.parametrize(
    ("service", "method"),
    [(INVENTORY, "RestockProduct"), ("orders.v1.EventStreamService", "Subscribe")],
)
async def test_a_call_that_ends_without_its_request_is_counted_and_logged(
    service: str, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused INVALID_ARGUMENT by the gateway, like a request that does not parse: a
    flood of such calls must show in the metrics and the access log like any other."""
    caplog.set_level(logging.INFO, logger="order_gateway.access")
    async with running(metrics_listen="127.0.0.1:0") as (gateway, clients):
        stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = clients.channel.stream_stream(
            f"/{service}/{method}", request_serializer=None, response_deserializer=None
        )
        ended = stream(iter(()), metadata=(("x-request-id", "without-request"),))
        assert await ended.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await ended.details() == "the call ended without its request message"
        labels = rpc_labels(service, method, grpc_code="INVALID_ARGUMENT")
        samples = await scrape_once_counted(gateway, "grpc_server_handled_total", labels)
    assert samples[("grpc_server_handled_total", labels)] == 1
    (line,) = [r for r in caplog.records if "request_id=without-request" in r.getMessage()]
    assert line.getMessage().startswith(f"/{service}/{method} INVALID_ARGUMENT ")
