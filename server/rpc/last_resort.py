"""The one place where an error escaping a method becomes its gRPC status.

Outermost of the interceptors that act on calls (only observability wraps it, so that it
sees the status sent): an exception a method lets escape is answered with its mapped
status (``status_for``), and anything unexpected with INTERNAL and a generic message.
Without it grpcio would answer UNKNOWN with the exception's text.
"""

from __future__ import annotations

import grpc

from server.rpc.method_handlers import (
    CallScope,
    Context,
    Handler,
    WrappingInterceptor,
    is_streaming_response,
    wrapped,
)
from server.rpc.status_mapping import plain_status, status_for, unexpected_error_status

COMMAND_SERVICES = ("/orders.v1.OrderCommandService/", "/orders.v1.InventoryCommandService/")
"""The services whose calls are commands, each retried safely by its ``command_id``."""


class LastResortInterceptor(WrappingInterceptor):
    def wrap(self, handler: Handler, method: str) -> Handler:
        streaming = is_streaming_response(handler)
        command = method.startswith(COMMAND_SERVICES)
        return wrapped(handler, lambda request, context: _Answering(context, streaming, command))


class _Answering(CallScope):
    __slots__ = ("_command", "_context", "_streaming")

    def __init__(self, context: Context, streaming: bool, command: bool) -> None:
        self._context = context
        self._streaming = streaming
        self._command = command

    async def end(self, error: BaseException | None) -> bool:
        # Cancellation and aborts (a status already chosen) pass through untouched, and so
        # does grpc's InternalError: raised by a send on the call (an abort, a response)
        # that grpc could not start because the client had gone meanwhile (a cancel or a
        # deadline, while the request was being judged). grpc ends the call itself; there
        # is no one left to answer, and no fault of the server's to log.
        if not isinstance(error, Exception) or isinstance(
            error, grpc.aio.AbortError | grpc.aio.InternalError
        ):
            return False
        status = (
            status_for(error, command=self._command)
            or self._unimplemented(error)
            or unexpected_error_status(error)
        )
        if self._streaming:
            # Not abort_with_status: the client of a stream may already be gone (a
            # shutdown racing a disconnect), and a failed abort would surface as an error
            # of its own. Setting the status and ending lets grpc send it if anyone listens.
            self._context.set_trailing_metadata(status.trailing_metadata)
            self._context.set_code(status.code)
            self._context.set_details(status.details)
            return True
        await self._context.abort_with_status(status)
        return False

    def _unimplemented(self, error: Exception) -> grpc.Status | None:
        """UNIMPLEMENTED for a method its servicer left to the generated base class, which
        sets that code and raises NotImplementedError: not a fault of the server's."""
        if (
            isinstance(error, NotImplementedError)
            and self._context.code() == grpc.StatusCode.UNIMPLEMENTED
        ):
            return plain_status(grpc.StatusCode.UNIMPLEMENTED, "method not implemented")
        return None
