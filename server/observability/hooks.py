"""The observability hooks: what an observed RPC reports, and what tracing provides.

The observability interceptor reads a call's ids from its metadata once, when the call
starts, and puts them in ``current_request_id`` and ``current_correlation_id`` for the
rest of the call (each RPC runs in a task of its own): the rest of the server reads them
there, never the metadata again.

Declared apart from their implementations so that the interceptor, the metrics, the
access log and the tracing module depend on these types, not on each other, and so that
nothing imports opentelemetry unless tracing is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any, Protocol

import grpc

from domain.bus import Middleware
from domain.ports import EventStore
from domain.records import record

current_request_id: ContextVar[str] = ContextVar("current_request_id", default="")
"""The id of the RPC being served: the caller's ``x-request-id``, else a new one. Errors
are logged under it."""

current_correlation_id: ContextVar[str] = ContextVar("current_correlation_id", default="")
"""The caller's ``x-correlation-id`` (at most 128 characters), empty if it sent none."""


class ObservedCall(Protocol):
    """What the observability interceptor keeps of the call being served."""

    command_correlation_id: str
    """What the call's command and its events correlate by, once the command is built:
    the caller's ``x-correlation-id``, else the command's id (chosen by the server when
    the request had none). Empty before, and for calls that carry no command."""


current_observed_call: ContextVar[ObservedCall | None] = ContextVar(
    "current_observed_call", default=None
)
"""The observed call being served (None outside one). What the call learns for its access
line is kept there, not in a context variable of its own: a stop that cuts a call whose
handler still runs logs its line from another task, which cannot read the call's."""


def note_command_correlation_id(correlation_id: str) -> None:
    """The call's command is built: its access line reports ``correlation_id``."""
    call = current_observed_call.get()
    if call is not None:
        call.command_correlation_id = correlation_id


@record
class RpcOutcome:
    """What happened to one RPC, as every observer sees it."""

    method: str
    """The full method, e.g. ``/orders.v1.OrderCommandService/CreateOrder``."""
    rpc_type: str
    """``unary``, ``server_stream``, ``client_stream`` or ``bidi_stream``."""
    code: grpc.StatusCode
    duration: float
    """Seconds from the handler's start to its last message or error."""
    request_id: str
    correlation_id: str
    user_id: str
    peer: str
    trace_id: str
    """Hex W3C trace id with tracing on, else empty."""

    @property
    def service(self) -> str:
        return self.method.lstrip("/").partition("/")[0]

    @property
    def method_name(self) -> str:
        return self.method.rpartition("/")[2]


class RpcObserver(Protocol):
    def rpc_finished(self, outcome: RpcOutcome) -> None:
        """Called once per RPC, after its status is known. Must not raise or block."""
        ...


class RpcSpan(Protocol):
    @property
    def trace_id(self) -> str: ...

    def finish(self, code: grpc.StatusCode) -> None:
        """End the span with the call's status and restore the previous trace context."""
        ...

    def cut(self, code: grpc.StatusCode) -> None:
        """End the span with ``code`` from another task than the call's (a stop cut the
        call while its handler still runs): the trace context stays as the call's task
        has it, which only that task may restore."""
        ...


class Tracing(Protocol):
    """The tracing hooks the gateway uses; ``server.observability.tracing`` implements them.

    Declared here so that nothing imports opentelemetry unless tracing is on.
    """

    def rpc_span(self, method: str, metadata: Sequence[tuple[str, Any]]) -> RpcSpan:
        """Start the server span of an RPC, continuing the caller's ``traceparent``."""
        ...

    def command_middleware(self) -> Middleware:
        """A command-bus middleware that spans each dispatch."""
        ...

    def instrument_store(self, store: EventStore) -> EventStore:
        """``store`` with a span around each append."""
        ...

    def shutdown(self) -> None:
        """Export what is buffered and release the exporter."""
        ...
