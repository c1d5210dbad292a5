"""OpenTelemetry tracing (``--otel``): spans for each RPC, command dispatch and store append.

Needs the ``otel`` extra. ``server.app`` imports this module only when tracing is on, so
a gateway without ``--otel`` loads no opentelemetry code at all.

The RPC span continues the caller's W3C ``traceparent``/``tracestate`` metadata. Spans go
to an OTLP exporter configured by the standard ``OTEL_EXPORTER_OTLP_*`` variables
(default ``http://localhost:4317``); ``OTEL_SERVICE_NAME``, or ``service.name`` in
``OTEL_RESOURCE_ATTRIBUTES``, overrides the service name.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from domain.bus import Middleware, Next, Result
from domain.commands import Command
from domain.errors import DomainError
from domain.ports import Commit, EventStore, RecordedEvent
from server.observability.hooks import RpcSpan
from server.stores.decorator import EventStoreDecorator

INSTRUMENTATION_NAME = "order_gateway"
SHUTDOWN_TIMEOUT = 2.0
"""Seconds a stopping gateway waits for buffered spans to be exported."""

SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
"""Codes that mark a server span as an error (OpenTelemetry's gRPC conventions); the
others are the client's doing and leave the span's status unset."""


def service_resource() -> Resource:
    """The gateway's resource: named ``order-gateway`` unless ``OTEL_SERVICE_NAME`` or
    ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES`` names the service (attributes given
    to ``Resource.create`` would win over the variables), with the variables' other
    attributes."""
    return Resource.create({SERVICE_NAME: "order-gateway"}).merge(OTELResourceDetector().detect())


class OtelTracing:
    """The ``server.observability.Tracing`` hooks, backed by an OpenTelemetry provider."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer(INSTRUMENTATION_NAME)
        # W3C trace context explicitly, whatever global propagator a host process set.
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_environment(cls) -> OtelTracing:
        """A provider exporting over OTLP/gRPC, configured by ``OTEL_*`` variables."""
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # Shut down by the gateway, within a bound (see ``shutdown``), not at exit.
        provider = TracerProvider(resource=service_resource(), shutdown_on_exit=False)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider)

    def rpc_span(self, method: str, metadata: Sequence[tuple[str, Any]]) -> RpcSpan:
        carrier = {key: value for key, value in metadata if isinstance(value, str)}
        parent = self._propagator.extract(carrier)
        full_name = method.lstrip("/")
        service, _, name = full_name.partition("/")
        span = self._tracer.start_span(
            full_name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return _OtelRpcSpan(span, token)

    def command_middleware(self) -> Middleware:
        return _CommandSpans(self._tracer)

    def instrument_store(self, store: EventStore) -> EventStore:
        return _TracedEventStore(store, self._tracer)

    def shutdown(self) -> None:
        # Export what is buffered, but never hold up the process's exit for long: with an
        # unreachable collector the exporter retries for up to 30 s. The thread is a daemon
        # so that one still stuck when the bound passes does not keep the process alive.
        flusher = threading.Thread(
            target=self._provider.shutdown, name="otel-shutdown", daemon=True
        )
        flusher.start()
        flusher.join(SHUTDOWN_TIMEOUT)


class _OtelRpcSpan:
    def __init__(self, span: Span, token: object) -> None:
        self._span = span
        self._token = token

    @property
    def trace_id(self) -> str:
        return trace.format_trace_id(self._span.get_span_context().trace_id)

    def finish(self, code: grpc.StatusCode) -> None:
        self.cut(code)
        otel_context.detach(self._token)  # type: ignore[arg-type]

    def cut(self, code: grpc.StatusCode) -> None:
        self._span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in SERVER_ERROR_CODES:
            self._span.set_status(Status(StatusCode.ERROR, code.name))
        self._span.end()


class _CommandSpans:
    """Bus middleware: one span per command dispatch (replays and retries inside it)."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def __call__(self, command: Command, call_next: Next) -> Result:
        name = type(command).__name__
        with _span(
            self._tracer,
            f"command {name}",
            {"order_gateway.command": name, "order_gateway.command_id": command.command_id},
        ) as span:
            result = await call_next(command)
            span.set_attribute("order_gateway.events", len(result))
            return result


class _TracedEventStore(EventStoreDecorator):
    def __init__(self, inner: EventStore, tracer: trace.Tracer) -> None:
        super().__init__(inner)
        self._tracer = tracer

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        with _span(
            self._tracer,
            "store.append",
            {
                "order_gateway.command_id": commit.command_id,
                "order_gateway.events": len(commit.events),
            },
        ):
            return await self._inner.append(commit)


@contextlib.contextmanager
def _span(tracer: trace.Tracer, name: str, attributes: dict[str, Any]) -> Iterator[Span]:
    """A span around a step of the command path. A ``DomainError`` (a rejection the
    client caused, or a conflict or duplicate that is retried or replayed above) is
    noted by its reason, not as a server error; any other error marks the span failed."""
    with tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except DomainError as error:
            span.set_attribute("order_gateway.error.reason", error.reason)
            raise
        except Exception as error:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise
