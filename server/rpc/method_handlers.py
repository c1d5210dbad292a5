"""Wrapped gRPC method handlers: one way to wrap a behaviour, built once per method.

Every interceptor of the gateway acts on a call the same way: it runs the method's
behaviour inside something of its own (a check before it, a timer or an error handler
around it). ``wrapped`` rebuilds a handler of the same kind around its behaviour, and
``WrappedHandlers`` keeps each method's wrapper for reuse.
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


class Around(Protocol):
    def __call__(self, request: Any, context: Context) -> AbstractAsyncContextManager[object]:
        """What runs around one call's behaviour: entered before it, exited after its
        last response or its error (``request`` is the request iterator of a
        client-streaming method)."""
        ...


class WrappedHandlers:
    """Per method, ``wrap(handler, method)`` of the handler grpc found for it.

    An interceptor's wrapper holds no per-call state (each call reads its own metadata),
    so it is built on the first call and reused: building handlers on every call was a
    third of the interceptor stack's time. A different handler for the method (a servicer
    registered again) gets a new wrapper.
    """

    def __init__(self, wrap: Callable[[Handler, str], Handler]) -> None:
        self._wrap = wrap
        self._by_method: dict[str, tuple[Handler, Handler]] = {}

    def get(self, handler: Handler, method: str) -> Handler:
        cached = self._by_method.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(handler, method))
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
    deserializer = request_deserializer or handler.request_deserializer
    serializer = handler.response_serializer
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, around),
            request_deserializer=deserializer,
            response_serializer=serializer,
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, around),
            request_deserializer=deserializer,
            response_serializer=serializer,
        )
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _single(handler.unary_unary, around),
            request_deserializer=deserializer,
            response_serializer=serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _single(handler.stream_unary, around),
            request_deserializer=deserializer,
            response_serializer=serializer,
        )
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


class _Checked(AbstractAsyncContextManager[None]):
    __slots__ = ("_check", "_context", "_request")

    def __init__(
        self, check: Callable[[Any, Context], Awaitable[None]], request: Any, context: Context
    ) -> None:
        self._check = check
        self._request = request
        self._context = context

    async def __aenter__(self) -> None:
        await self._check(self._request, self._context)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


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
