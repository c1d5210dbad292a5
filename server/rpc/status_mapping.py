"""One mapping from exceptions to gRPC statuses with rich error details.

Details travel in ``grpc-status-details-bin`` as a ``google.rpc.Status`` (grpcio-status).
Anything not listed here is INTERNAL with a generic message; the caller of
``status_for`` logs the real error.
"""

from __future__ import annotations

import collections
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from pydantic import ValidationError

from domain.errors import (
    CommandIdReusedError,
    ConcurrencyConflictError,
    DomainError,
    InsufficientInventoryError,
    NotFoundError,
    OrderAlreadyCancelledError,
    OrderNotFoundError,
    PermissionDeniedError,
    ProductNotFoundError,
    StoreFullError,
    StoreUnavailableError,
)
from server.observability.hooks import current_request_id
from server.rpc.subscription_hub import HubClosedError, TooManySubscribersError
from server.stopping import ServerStoppingError

log = logging.getLogger("order_gateway.errors")

ERROR_DOMAIN = "order-gateway"
INTERNAL_MESSAGE = "internal error"
STORE_UNAVAILABLE = "the event store cannot be reached; retry later"
STORE_UNAVAILABLE_COMMAND = (
    "the event store cannot be reached; retrying with the same command_id is safe"
)


def field_path(location: Iterable[int | str]) -> str:
    """``("items", 2, "quantity")`` → ``"items[2].quantity"`` (proto field names)."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def status_for(error: BaseException, *, command: bool = False) -> grpc.Status | None:
    """The status for a known error, or None for an unexpected one (answer INTERNAL).

    ``command``: the call is a command's (CreateOrder, …), whose retry is safe with the
    same ``command_id``; a subscription or a consumer-group call has none to name.

    A pydantic ValidationError is not "known" here: only the one raised while building a
    command from a request is the client's fault (``validation_status``); one raised
    anywhere else is a server bug.
    """
    if isinstance(error, DomainError):
        return _domain_status(error)
    if isinstance(error, StoreUnavailableError):
        return _status(
            code_pb2.UNAVAILABLE,
            STORE_UNAVAILABLE_COMMAND if command else STORE_UNAVAILABLE,
            _error_info(error.reason, {}),
        )
    if isinstance(error, StoreFullError):
        return _status(
            code_pb2.RESOURCE_EXHAUSTED,
            "the event store is out of space; nothing was committed",
            _error_info(error.reason, {}),
        )
    if isinstance(error, TooManySubscribersError):
        return plain_status(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open subscriptions, retry later"
        )
    if isinstance(error, HubClosedError | ServerStoppingError):
        return plain_status(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
    return None


def unexpected_error_status(error: BaseException) -> grpc.Status:
    """INTERNAL with a generic message, for an error nobody anticipated.

    The full error goes to the log under the call's request id, which the caller receives
    as ``x-request-id`` trailing metadata to quote in a support request. It travels in the
    status itself because ``abort_with_status`` replaces trailers set beforehand.
    """
    request_id = current_request_id.get() or uuid.uuid4().hex
    log.error("unexpected error (request %s)", request_id, exc_info=error)
    status = _status(code_pb2.INTERNAL, INTERNAL_MESSAGE)
    return _TrailedStatus(
        status.code, status.details, (*status.trailing_metadata, ("x-request-id", request_id))
    )


class _TrailedStatus(
    collections.namedtuple("_TrailedStatus", ("code", "details", "trailing_metadata")),
    grpc.Status,
):
    pass


def validation_status(error: ValidationError) -> grpc.Status:
    """A command's validation error: its messages are already worded for the client."""
    return bad_request_status((field_path(d["loc"]), d["msg"]) for d in error.errors())


MAX_VIOLATION_BYTES = 2048
"""The most bytes of violations one detail (BadRequest, PreconditionFailure) carries. The
details (in base64, with the message inside) and the message travel in the trailers,
which gRPC clients refuse beyond 8 KiB by default (more and more often up to 16 KiB, then
always), answering RESOURCE_EXHAUSTED instead of the error: the 501 violations of an
order whose 100 items are all wrong took 43 KiB, the 100 shortages of one whose items are
all short 15 KiB. 2 KiB of violations make about 4.7 KiB of trailers."""
MAX_MESSAGE_CHARS = 1024
"""The longest status message (it travels twice: as itself and inside the details)."""
MAX_DESCRIPTION_CHARS = 512
"""The longest description of one violation: one quoting a value the client sent (an
unknown event type of 20,000 characters) must not make the first violation, which is
always reported, overflow the trailers by itself."""

V = TypeVar("V", bound=Message)


def _fitting(violations: Sequence[V]) -> list[V]:
    """The first of ``violations`` that fit ``MAX_VIOLATION_BYTES`` (at least one)."""
    reported: list[V] = []
    size = 0
    for violation in violations:
        size += violation.ByteSize() + 4  # its tag and length in the detail
        if reported and size > MAX_VIOLATION_BYTES:
            break
        reported.append(violation)
    return reported


def _shortened(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


def bad_request_status(violations: Iterable[tuple[str, str]]) -> grpc.Status:
    """INVALID_ARGUMENT with a BadRequest naming each ``(field path, description)``, or
    the first of them that fit ``MAX_VIOLATION_BYTES``, the message counting the rest."""
    field_violations = [
        error_details_pb2.BadRequest.FieldViolation(
            field=field, description=_shortened(description, MAX_DESCRIPTION_CHARS)
        )
        for field, description in violations
    ]
    reported = _fitting(field_violations)
    fields = ", ".join(v.field for v in reported)
    omitted = len(field_violations) - len(reported)
    return _status(
        code_pb2.INVALID_ARGUMENT,
        f"invalid request: {fields}" + (f" and {omitted} more" if omitted else ""),
        error_details_pb2.BadRequest(field_violations=reported),
    )


def _domain_status(error: DomainError) -> grpc.Status:
    message = str(error)
    if isinstance(error, NotFoundError):
        metadata = (
            {"order_id": error.order_id}
            if isinstance(error, OrderNotFoundError)
            else {"product_id": error.product_id}
            if isinstance(error, ProductNotFoundError)
            else {}
        )
        return _status(code_pb2.NOT_FOUND, message, _error_info(error.reason, metadata))
    if isinstance(error, InsufficientInventoryError):
        failure = error_details_pb2.PreconditionFailure(
            violations=_fitting(
                [
                    error_details_pb2.PreconditionFailure.Violation(
                        type="STOCK",
                        subject=f"product-{s.product_id}",
                        description=f"requested {s.requested}, available {s.available}",
                    )
                    for s in error.shortages
                ]
            )
        )
        return _status(
            code_pb2.FAILED_PRECONDITION, message, failure, _error_info(error.reason, {})
        )
    if isinstance(error, OrderAlreadyCancelledError):
        return _status(
            code_pb2.FAILED_PRECONDITION,
            message,
            _error_info(error.reason, {"order_id": error.order_id}),
        )
    if isinstance(error, CommandIdReusedError):
        return _status(
            code_pb2.ALREADY_EXISTS,
            message,
            _error_info(error.reason, {"command_id": error.command_id}),
        )
    if isinstance(error, ConcurrencyConflictError):
        return _status(
            code_pb2.ABORTED,
            "the command lost a race with concurrent writers; retrying it is safe",
            _error_info(error.reason, {}),
        )
    if isinstance(error, PermissionDeniedError):
        return _status(code_pb2.PERMISSION_DENIED, message, _error_info(error.reason, {}))
    return _status(code_pb2.FAILED_PRECONDITION, message, _error_info(error.reason, {}))


def _error_info(reason: str, metadata: Mapping[str, str]) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)


def _status(code: int, message: str, *details: Message) -> grpc.Status:
    message = _shortened(message, MAX_MESSAGE_CHARS)
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code, message=message, details=packed)
    )
    return status


def plain_status(code: grpc.StatusCode, message: str) -> grpc.Status:
    """A status with no details (authentication, limits, shutdown)."""
    return _status(code.value[0], message)
