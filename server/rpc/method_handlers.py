"""One way for an interceptor to act on calls: wrap each method's handler, once.

Every interceptor of the gateway runs the method's behaviour inside something of its own
(a check before it, a timer or an error handler around it). ``wrapped`` rebuilds a
handler of the same kind around its behaviour, and ``WrappingInterceptor`` builds each
method's wrapper once and reuses it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Protocol, TypeAlias, cast

import grpc

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class CallScope(AbstractAsyncContextManager[None]):
    """What an interceptor runs around one call: ``start`` before the method's behaviour,
    ``end`` after its last response or with its error."""

    __slots__ = ()

    async def start(self) -> None:
        return None

    async def end(self, error: BaseException | None) -> bool:
        """Called with the error the behaviour raised, if any; True swallows it."""
        return False

    async def __aenter__(self) -> None:
        await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return await self.end(exc)


class Around(Protocol):
    def __call__(self, request: Any, context: Context) -> CallScope:
        """The scope of one call (``request`` is the request iterator of a
        client-streaming method)."""
        ...


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps the handler of each method it ``applies_to``.

    The wrapper holds no per-call state (each call reads its own metadata), so it is
    built on a method's first call and reused: building handlers on every call was a
    third of the interceptor stack's time. A different handler for the method (a servicer
    registered again) gets a new wrapper. Unknown methods (no handler) are left to grpc,
    which answers UNIMPLEMENTED.
    """

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[Handler, Handler]] = {}

    def applies_to(self, method: str, handler: Handler) -> bool:
        return True

    def wrap(self, handler: Handler, method: str) -> Handler:
        """``handler`` as this interceptor serves it."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.applies_to(method, handler):
            return handler
        cached = self._by_method.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self.wrap(handler, method))
            self._by_method[method] = cached
        return cached[1]


def is_streaming_response(handler: Handler) -> bool:
    return handler.unary_stream is not None or handler.stream_stream is not None


def wrapped(
    handler: Handler,
    around: Around,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """``handler`` of the same kind, its behaviour run inside ``around(request, context)``.

    ``request_deserializer`` replaces the handler's own when given.
    """
    for kind, make_handler, wrap in _KINDS:
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            rebuilt: Handler = make_handler(
                wrap(behaviour, around),
                request_deserializer=request_deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            return rebuilt
    return handler


def checked_first(
    handler: Handler,
    check: Callable[[Any, Context], Awaitable[None]],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """``handler`` whose behaviour runs only after ``check(request, context)`` returned
    (a check refuses the call by aborting it)."""
    return wrapped(
        handler, lambda request, context: _Checked(check, request, context), request_deserializer
    )


class _Checked(CallScope):
    __slots__ = ("_check", "_context", "_request")

    def __init__(
        self, check: Callable[[Any, Context], Awaitable[None]], request: Any, context: Context
    ) -> None:
        self._check = check
        self._request = request
        self._context = context

    async def start(self) -> None:
        await self._check(self._request, self._context)


def _streaming(behaviour: Any, around: Around) -> Any:
    # grpc calls a streaming behaviour differently by its kind (it checks the function):
    # an async generator yields responses, a coroutine (health's Watch) writes them
    # through its context. The wrapper must be of the same kind.
    if inspect.iscoroutinefunction(behaviour):
        return _single(behaviour, around)
    # grpc's stubs type behaviours as synchronous; on an aio server they are async.
    stream = cast(Callable[[Any, Context], AsyncIterator[Any]], behaviour)

    async def call(request: Any, context: Context) -> AsyncIterator[Any]:
        async with around(request, context):
            async for response in stream(request, context):
                yield response

    return call


def _single(behaviour: Any, around: Around) -> Any:
    single = cast(Callable[[Any, Context], Awaitable[Any]], behaviour)

    async def call(request: Any, context: Context) -> Any:
        async with around(request, context):
            return await single(request, context)

    return call


_KINDS: tuple[tuple[str, Callable[..., Handler], Callable[[Any, Around], Any]], ...] = (
    ("unary_stream", grpc.unary_stream_rpc_method_handler, _streaming),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, _streaming),
    ("unary_unary", grpc.unary_unary_rpc_method_handler, _single),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, _single),
)
"""Each kind of handler: its behaviour's attribute, how grpc builds one, how to wrap it."""
