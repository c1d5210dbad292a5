"""One server interceptor that observes every RPC: status code, duration, caller and ids.

It wraps each handler once and hands the outcome of every call to observers (the
Prometheus metrics, the access log). With tracing on, it also opens the RPC's span
around the handler, so the spans of command dispatch and store append nest under it.

Status codes are taken without touching a cancelled call's context: in grpcio 1.85,
calling ``context.peer()`` or reading other context state after the client had cancelled
a server-streaming call crashed the whole process (a segfault, not an exception), so the
peer and metadata are read once when the call starts.

A stop can report a call before its handler ends (``cut_running``): grpc has answered it
already, and the handler's task may carry on past the process's last log line. What the
call's outcome reports is therefore kept in the call's scope, never read from the call's
context variables at its end (another task cannot read them).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from typing import Any

import grpc

from domain.ids import random_hex_id
from server.observability.hooks import (
    RpcObserver,
    RpcOutcome,
    RpcSpan,
    Tracing,
    current_correlation_id,
    current_observed_call,
    current_request_id,
)
from server.rpc.method_handlers import (
    CallScope,
    Context,
    Handler,
    WrappingInterceptor,
    wrapped,
)
from server.security.identity import current_caller

REQUEST_ID_HEADER = "x-request-id"
CORRELATION_HEADER = "x-correlation-id"
MAX_ID_LENGTH = 128
# A client-chosen request id is logged verbatim, so only printable, unambiguous characters.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


class _NoSpan:
    """Stands in for a span when tracing is off."""

    trace_id = ""

    def finish(self, code: grpc.StatusCode) -> None:
        return None

    def cut(self, code: grpc.StatusCode) -> None:
        return None


_NO_SPAN = _NoSpan()


class ObservabilityInterceptor(WrappingInterceptor):
    def __init__(self, observers: Sequence[RpcObserver], tracing: Tracing | None = None) -> None:
        super().__init__()
        self.observers = tuple(observers)
        self._tracing = tracing
        self._running: set[_Observed] = set()
        """Calls whose behaviour has begun and not yet ended (their last response, or
        status, may still be on its way to the client), and that no stop has cut."""

    @property
    def running(self) -> int:
        """How many calls' behaviour has begun and not yet ended."""
        return len(self._running)

    def cut_running(self) -> None:
        """Report every call still running as CANCELLED, now: for use once grpc's shutdown
        has ended, when grpc has answered each of them (UNAVAILABLE "Cancelling all
        calls") and cancelled its handler, which may yet carry on for a while. Its own end,
        if it comes, reports nothing more."""
        for call in list(self._running):
            call.cut()

    # Unknown methods are not observed: grpc answers UNIMPLEMENTED itself, and arbitrary
    # method names must not blow up the metrics' label sets.
    def wrap(self, handler: Handler, method: str) -> Handler:
        return self._observed(handler, method, handler)

    def wrap_refusal(self, refusing: Handler, method: str, handler: Handler) -> Handler:
        # Labelled with the method's own type, not that of the handler that refuses it.
        return self._observed(refusing, method, handler)

    def _observed(self, serving: Handler, method: str, handler: Handler) -> Handler:
        rpc_type = _RPC_TYPES[(handler.request_streaming, handler.response_streaming)]
        return wrapped(
            serving, lambda request, context: self._observing(method, rpc_type, request, context)
        )

    def _observing(self, method: str, rpc_type: str, request: Any, context: Context) -> _Observed:
        # Read when the call starts, never after (see the module docstring).
        metadata = tuple(context.invocation_metadata() or ())
        request_id, correlation_header = _ids(metadata)
        # As for events: without x-correlation-id a command correlates by its command_id.
        correlation_id = (
            correlation_header or str(getattr(request, "command_id", ""))[:MAX_ID_LENGTH]
        )
        # Each RPC runs in a task of its own, so the ids need no reset afterwards.
        current_request_id.set(request_id)
        current_correlation_id.set(correlation_header)
        span = self._tracing.rpc_span(method, metadata) if self._tracing else _NO_SPAN
        observed = _Observed(
            method,
            rpc_type,
            request_id,
            correlation_id,
            # Set by the auth interceptor's early check, which ran in this task already.
            current_caller.get().user_id,
            context.peer(),
            span,
            context,
            self,
        )
        current_observed_call.set(observed)
        self._running.add(observed)
        return observed


_RPC_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


class _Observed(CallScope):
    """Times one call and reports its outcome when the handler returns or raises.

    It keeps what is read from the call before the handler runs (never after) in slots
    of its own: in a record apart, built for every call, it cost about 2,300
    instructions more a call under callgrind.
    """

    __slots__ = (
        "_context",
        "_correlation_id",
        "_interceptor",
        "_method",
        "_peer",
        "_request_id",
        "_rpc_type",
        "_span",
        "_started",
        "_user_id",
        "command_correlation_id",
    )

    def __init__(
        self,
        method: str,
        rpc_type: str,
        request_id: str,
        correlation_id: str,
        user_id: str,
        peer: str,
        span: RpcSpan,
        context: Context,
        interceptor: ObservabilityInterceptor,
    ) -> None:
        self._method = method
        self._rpc_type = rpc_type
        self._request_id = request_id
        self._correlation_id = correlation_id
        """What the call correlates by: the ``x-correlation-id`` header, else the
        request's ``command_id``."""
        self.command_correlation_id = ""
        """The command's, once built (``hooks.note_command_correlation_id``)."""
        self._user_id = user_id
        self._peer = peer
        self._span = span
        self._context = context
        self._interceptor = interceptor
        self._started = time.perf_counter()

    async def end(self, error: BaseException | None) -> bool:
        try:
            self._interceptor._running.remove(self)
        except KeyError:
            return False  # Cut by a stop, and reported then.
        code = self._code_for(error)
        self._span.finish(code)
        self._report(code)
        return False

    def cut(self) -> None:
        """Report the call CANCELLED before its handler ends (see ``cut_running``)."""
        self._interceptor._running.discard(self)
        self._span.cut(grpc.StatusCode.CANCELLED)
        self._report(grpc.StatusCode.CANCELLED)

    def _report(self, code: grpc.StatusCode) -> None:
        duration = time.perf_counter() - self._started
        # Built from positions, as records on the commit path are: from keywords it cost
        # about 450 instructions more a field.
        outcome = RpcOutcome(
            self._method,
            self._rpc_type,
            code,
            duration,
            self._request_id,
            # The command's, once built: the request's may be empty.
            self.command_correlation_id or self._correlation_id,  # correlation_id
            self._user_id,
            self._peer,
            self._span.trace_id,
        )
        for observer in self._interceptor.observers:
            observer.rpc_finished(outcome)

    def _code_for(self, error: BaseException | None) -> grpc.StatusCode:
        if error is None:
            # The handler returned normally: OK unless it set another code itself.
            return _set_code(self._context) or grpc.StatusCode.OK
        if isinstance(error, grpc.aio.AbortError):
            # abort()/abort_with_status() recorded the code before raising.
            return _set_code(self._context) or grpc.StatusCode.UNKNOWN
        if isinstance(error, asyncio.CancelledError | GeneratorExit | grpc.aio.InternalError):
            # The client went away (or the server is stopping): never touch the context.
            # InternalError: a send grpc could not start, the client being gone (see
            # server.rpc.last_resort).
            return grpc.StatusCode.CANCELLED
        # grpc answers an exception that escapes a handler with UNKNOWN.
        return grpc.StatusCode.UNKNOWN


def _set_code(context: Context) -> grpc.StatusCode | None:
    code = context.code()
    if code is None:
        return None
    if isinstance(code, grpc.StatusCode):
        return code
    return _CODES_BY_VALUE.get(int(code), grpc.StatusCode.UNKNOWN)


_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _ids(metadata: tuple[tuple[str, Any], ...]) -> tuple[str, str]:
    """The call's request id (the caller's ``x-request-id``, else a new one) and the first
    ``x-correlation-id`` it sent (empty if none)."""
    request_id = ""
    correlation_header: str | None = None
    for key, value in metadata:
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _SAFE_ID.fullmatch(value):
            request_id = value
        elif (
            key == CORRELATION_HEADER
            and isinstance(value, str)
            and correlation_header is None
            # A blank header names nothing to correlate by, as an absent one.
            and not value.isspace()
        ):
            correlation_header = value[:MAX_ID_LENGTH]
    return request_id or random_hex_id(), correlation_header or ""
