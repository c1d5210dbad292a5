"""``ServiceTable``: the gateway's services, served by one generic handler, method by method.

The ``add_*_to_server`` functions ``grpc_tools.protoc`` generates (grpcio-reflection's and
grpcio-health-checking's too) register each service twice: as a generic handler, as
every grpc release has, and method by method as "registered methods" (grpcio 1.63+),
which take precedence. Counted under callgrind on grpcio 1.85, with the gateway's
services registered that way every call cost about 79,000 more instructions (CreateOrder
on SQLite: 1,776,000 against 1,697,000 per call; a server answering with ready-made
responses, without interceptors: 744,000 against 689,000). So the generated functions
add the gateway's services to this table instead, which the server serves as its one
generic handler: one lookup of the method per call.

The table also lets the server start before the services that need the store exist.
Until ``open``, a call to one of those (``held_services``) is held, with the kind and
message types its method will have, and runs once the table opens; a call whose
deadline comes first is refused UNAVAILABLE ("the server is starting") before it, with
time left to retry (``wait_before_refusal``).
If the start fails or a stop comes first, every held call is refused (``refuse_held``).
Health and reflection, added before the server starts, are served at once, so that
probes read NOT_SERVING while the store opens.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, cast

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from server.rpc.method_handlers import Context, Handler, wait_before_refusal
from server.rpc.status_mapping import plain_status

STARTING: Final = plain_status(grpc.StatusCode.UNAVAILABLE, "the server is starting")


class ServiceTable(grpc.GenericRpcHandler):
    def __init__(self, held_services: Iterable[ServiceDescriptor] = ()) -> None:
        self._handlers: dict[str, Handler] = {}
        self._opened = asyncio.Event()
        self._refusal: grpc.Status | None = None
        self._held = {
            f"/{service.full_name}/{method.name}": _held_handler(method, self)
            for service in held_services
            for method in service.methods
        }
        # What ``service`` looks calls up in: the held methods until the table opens.
        self._serving: dict[str, Handler] = dict(self._held)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        return self._serving.get(handler_call_details.method)

    def open(self) -> None:
        """Serve every method added, and run the calls held until now."""
        self._serving = dict(self._handlers)
        self._opened.set()

    def refuse_held(self, status: grpc.Status) -> None:
        """Refuse the held calls, and any that still come, with ``status`` (the start
        failed, or a stop came first)."""
        self._refusal = status
        self._opened.set()

    async def handler_once_open(self, method: str, context: Context) -> Handler:
        """``method``'s handler once the table opens; aborts the call if it does not
        open before the call's deadline."""
        if not self._opened.is_set():
            # asyncio.timeout, not wait_for: see server.cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_before_refusal(context)):
                    await self._opened.wait()
        if self._refusal is not None:
            await context.abort_with_status(self._refusal)
        handler = self._handlers.get(method)
        if not self._opened.is_set() or handler is None:
            await context.abort_with_status(STARTING)
        return handler

    # What the generated ``add_*_to_server`` functions call on the server they are given.
    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Left out: the same methods come one by one through
        ``add_registered_method_handlers``."""

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        for name, handler in method_handlers.items():
            method = f"/{service_name}/{name}"
            self._handlers[method] = handler
            if method not in self._held:
                # Served from now on: only the held methods wait for ``open``.
                self._serving[method] = handler

    def as_server(self) -> grpc.aio.Server:
        """This table where the generated functions' signatures want a server."""
        return cast(grpc.aio.Server, self)


def _held_handler(method: MethodDescriptor, table: ServiceTable) -> Handler:
    """A handler of ``method``'s kind and message types whose calls wait for the table to
    open, then run the handler added for the method."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)
    types: dict[str, Callable[..., Any]] = {
        "request_deserializer": request_type.FromString,
        "response_serializer": response_type.SerializeToString,
    }

    if method.server_streaming:

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            handler = await table.handler_once_open(path, context)
            behaviour = handler.stream_stream if method.client_streaming else handler.unary_stream
            responses = cast(Callable[[Any, Context], AsyncGenerator[Any, None]], behaviour)
            async with contextlib.aclosing(responses(request, context)) as running:
                async for response in running:
                    yield response

        if method.client_streaming:
            return grpc.stream_stream_rpc_method_handler(stream, **types)
        return grpc.unary_stream_rpc_method_handler(stream, **types)

    async def single(request: Any, context: Context) -> Any:
        handler = await table.handler_once_open(path, context)
        behaviour = handler.stream_unary if method.client_streaming else handler.unary_unary
        return await cast(Callable[[Any, Context], Any], behaviour)(request, context)

    if method.client_streaming:
        return grpc.stream_unary_rpc_method_handler(single, **types)
    return grpc.unary_unary_rpc_method_handler(single, **types)
