"""Methods whose client sends one request, served as if their client streamed requests.

grpcio's aio server (1.85) reads a unary request before it runs the method's handler,
and when the call ends without one (a client that half-closes at once, or whose only
message grpc cannot read) it returns without answering: the call keeps its place among
the server's concurrent calls (``maximum_concurrent_rpcs``) until its client goes away.
A stranger holding a connection open could take every place with such calls, none of
them reaching the gateway's interceptors' budgets, and lock every caller out
(RESOURCE_EXHAUSTED). Served as a client-streaming method, the handler runs as the call
arrives and reads the request itself, so a call without one is refused at once.

On the wire nothing changes: gRPC has no unary framing of its own, and a client cannot
tell how the server reads the message.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, cast

import grpc

from server.rpc.status_mapping import plain_status

if TYPE_CHECKING:
    from server.rpc.method_handlers import Context, Handler

NO_REQUEST: Final = plain_status(
    grpc.StatusCode.INVALID_ARGUMENT, "the call ended without its request message"
)


class _MissingRequest:
    """Stands in for the request of a call that ended without one."""


MISSING_REQUEST: Final = _MissingRequest()
"""What a method is handed for a call that ended without its request when one of its
interceptors refuses such calls (``server.rpc.decoding``): refused there, inside
observability, the call is logged and counted like any other refused call."""


WRITTEN: Final = "__responses_written__"
"""The attribute of a streaming behaviour that holds the same behaviour as a coroutine
writing each response through the context (the interceptors' wrappers have one,
``server.rpc.method_handlers``)."""


def reading_its_request(handler: Handler, missing_refused: bool = False) -> Handler:
    """``handler`` (a method that takes one request) served as a client-streaming
    method whose first message is its request; any other handler as it is. A call that
    ends without its request is refused here, or, with ``missing_refused`` (its wrapper
    refuses one), handed over as ``MISSING_REQUEST``."""
    _the_request = _handed_over if missing_refused else _refused
    types: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        single = cast(Callable[[Any, "Context"], Awaitable[Any]], handler.unary_unary)

        async def answer(requests: AsyncIterator[Any], context: Context) -> Any:
            return await single(await _the_request(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(answer, **types)
    if handler.unary_stream is None:
        return handler
    if inspect.iscoroutinefunction(handler.unary_stream):
        # It writes its responses through the context (health's Watch).
        writes = cast(Callable[[Any, "Context"], Awaitable[None]], handler.unary_stream)

        async def written(requests: AsyncIterator[Any], context: Context) -> None:
            await writes(await _the_request(requests, context), context)

        return grpc.stream_stream_rpc_method_handler(written, **types)
    stream = cast(Callable[[Any, "Context"], AsyncIterator[Any]], handler.unary_stream)
    written_by = getattr(stream, WRITTEN, None)
    if written_by is not None:
        # The interceptors' wrapper, run as the coroutine that writes the responses: no
        # async generator of its own between grpc and the method's.
        writes = cast(Callable[[Any, "Context"], Awaitable[None]], written_by)

        async def served(requests: AsyncIterator[Any], context: Context) -> None:
            await writes(await _the_request(requests, context), context)

        return grpc.stream_stream_rpc_method_handler(served, **types)

    # A coroutine that writes each response, as grpc itself serves an async generator:
    # not a generator of our own around it, which would be resumed for every response.
    async def streamed(requests: AsyncIterator[Any], context: Context) -> None:
        async for response in stream(await _the_request(requests, context), context):
            await context.write(response)

    return grpc.stream_stream_rpc_method_handler(streamed, **types)


async def _handed_over(requests: AsyncIterator[Any], context: Context) -> Any:
    # Read through the context, as the iterator itself does, with no async generator of
    # grpc's to create and resume: counted by callgrind (CreateOrder on SQLite), a call
    # then costs about what it did served as unary (+5,000 instructions, within the
    # runs' noise), against +24,000 read through the iterator.
    request = await context.read()
    if request is grpc.aio.EOF:
        return MISSING_REQUEST
    return request


async def _refused(requests: AsyncIterator[Any], context: Context) -> Any:
    request = await context.read()
    if request is grpc.aio.EOF:
        await context.abort_with_status(NO_REQUEST)
    return request
