"""OpenTelemetry spans for RPCs, command dispatch and store appends (the ``otel`` extra)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode, format_span_id, format_trace_id

from server import app
from server.app import create_server
from server.config import Settings
from server.observability.otel import otel_tracing
from server.observability.tracing import OtelTracing, service_resource
from tests.clients import item, order_request
from tests.observability_support import FrozenStore, rpc_error, running
from tests.serving import listening_stranger
from tests.subscription_support import until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> OtelTracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OtelTracing(provider)


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    (span,) = [span for span in spans if span.name == name]
    return span


def parent_id(span: ReadableSpan) -> str:
    assert span.parent is not None, f"{span.name} has no parent"
    return format_span_id(span.parent.span_id)


def context_of(span: ReadableSpan) -> SpanContext:
    context = span.get_span_context()
    assert context is not None
    return context


def span_id(span: ReadableSpan) -> str:
    return format_span_id(context_of(span).span_id)


async def test_rpc_command_and_append_spans_continue_the_callers_trace(
    tracing: OtelTracing, exporter: InMemorySpanExporter
) -> None:
    async with running(tracing=tracing) as (_, clients):
        await clients.restock("sku-1", 5, metadata=TRACEPARENT)
    spans = exporter.get_finished_spans()

    rpc = by_name(spans, "orders.v1.InventoryCommandService/RestockProduct")
    command = by_name(spans, "command RestockProduct")
    append = by_name(spans, "store.append")
    assert {format_trace_id(context_of(s).trace_id) for s in (rpc, command, append)} == {TRACE_ID}
    assert rpc.kind == SpanKind.SERVER
    assert parent_id(rpc) == PARENT_SPAN_ID
    assert parent_id(command) == span_id(rpc)
    assert parent_id(append) == span_id(command)
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.system"] == "grpc"
    assert rpc.attributes["rpc.method"] == "RestockProduct"
    assert rpc.attributes["rpc.grpc.status_code"] == 0
    assert append.attributes is not None and append.attributes["order_gateway.events"] == 1


async def test_without_traceparent_each_rpc_starts_a_trace(
    tracing: OtelTracing, exporter: InMemorySpanExporter
) -> None:
    async with running(tracing=tracing) as (_, clients):
        await clients.restock("sku-1", 5)
        await clients.restock("sku-1", 5)
    rpcs = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert len(rpcs) == 2
    assert all(span.parent is None for span in rpcs)
    assert context_of(rpcs[0]).trace_id != context_of(rpcs[1]).trace_id


async def test_client_errors_are_noted_but_not_server_errors(
    tracing: OtelTracing, exporter: InMemorySpanExporter
) -> None:
    async with running(tracing=tracing) as (_, clients):
        error = await rpc_error(clients.create(order_request(item("no-such-sku"))))
        assert error.code() == grpc.StatusCode.NOT_FOUND
    spans = exporter.get_finished_spans()
    rpc = by_name(spans, "orders.v1.OrderCommandService/CreateOrder")
    command = by_name(spans, "command CreateOrder")
    assert rpc.attributes is not None and rpc.attributes["rpc.grpc.status_code"] == 5
    assert rpc.status.status_code == StatusCode.UNSET
    assert command.attributes is not None
    assert command.attributes["order_gateway.error.reason"] == "PRODUCT_NOT_FOUND"


async def test_a_call_a_stop_cuts_ends_its_span_cancelled_though_its_handler_carries_on(
    tracing: OtelTracing, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    store = FrozenStore()
    async with running(store, tracing=tracing, shutdown_grace=0.2) as (gateway, clients):
        call = asyncio.ensure_future(clients.restock("sku-1", 1, metadata=TRACEPARENT))
        await until(lambda: len(store.appending) == 1)
        await gateway.stop()
        await rpc_error(call)
        rpc = by_name(
            exporter.get_finished_spans(), "orders.v1.InventoryCommandService/RestockProduct"
        )
        assert rpc.attributes is not None and rpc.attributes["rpc.grpc.status_code"] == 1
        # The handler's end, in its own task, leaves the span and the trace context be.
        store.thawed.set()
        await until(lambda: store.ended == 1)
        await asyncio.sleep(0.05)
    # Neither ended twice nor detached in the stop's task, which OpenTelemetry would log.
    # (The handler's own spans end after tracing has shut down: those it drops.)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "on an ended span" not in logged
    assert "Failed to detach context" not in logged


async def test_access_log_carries_the_trace_id(
    tracing: OtelTracing, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="order_gateway.access")
    async with running(tracing=tracing) as (_, clients):
        await clients.restock("sku-1", 5, metadata=TRACEPARENT)
    (line,) = [r for r in caplog.records if r.name == "order_gateway.access"]
    assert line.__dict__["fields"]["trace_id"] == TRACE_ID


def test_tracing_off_imports_no_opentelemetry() -> None:
    program = textwrap.dedent(
        """
        import asyncio, sys
        from server.app import create_server
        from server.config import Settings

        async def main():
            gateway = await create_server(Settings(listen="127.0.0.1:0", store="memory://"))
            await gateway.start()
            await gateway.stop()

        asyncio.run(main())
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert not loaded, loaded
        """
    )
    subprocess.run([sys.executable, "-c", program], check=True, timeout=60)


@pytest.mark.parametrize(
    ("variables", "service"),
    [
        ({}, "order-gateway"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=checkout,team=orders"}, "checkout"),
        (
            {
                "OTEL_RESOURCE_ATTRIBUTES": "service.name=checkout",
                "OTEL_SERVICE_NAME": "orders-eu",
            },
            "orders-eu",
        ),
    ],
)
def test_the_service_is_named_as_the_standard_variables_say(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], service: str
) -> None:
    for name in ("OTEL_RESOURCE_ATTRIBUTES", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert service_resource().attributes["service.name"] == service


def test_otel_without_the_extra_is_a_clear_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "server.observability.tracing", None)
    # The install command the docs give: the gateway is installed from its source tree.
    with pytest.raises(ValueError, match=r"pip install '\.\[otel\]' in its source tree"):
        otel_tracing()


async def test_a_refused_start_shuts_down_the_tracing_it_created(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(app, "otel_tracing", lambda: OtelTracing(provider))
    with listening_stranger() as taken, pytest.raises(RuntimeError, match="listens there"):
        await create_server(Settings(listen=taken, store="memory://", otel=True))
    # Its exporter was shut down with it: what it buffered was sent, and it takes no more.
    provider.get_tracer("test").start_span("after").end()
    assert exporter.get_finished_spans() == ()


async def test_a_refused_start_leaves_tracing_it_was_given_to_its_owner(
    tracing: OtelTracing, exporter: InMemorySpanExporter
) -> None:
    with listening_stranger() as taken, pytest.raises(RuntimeError, match="listens there"):
        await create_server(Settings(listen=taken, store="memory://"), tracing=tracing)
    async with running(tracing=tracing) as (_, clients):
        await clients.restock("sku-1", 5)
    assert by_name(exporter.get_finished_spans(), "command RestockProduct")
