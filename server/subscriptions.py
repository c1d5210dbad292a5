"""``EventStreamService/Subscribe``: validates the request and streams a hub subscription.

The delivery logic (catch-up, handoff, live fan-out, checkpoints) lives in
``server.subscription_hub``; this module maps requests and failures to gRPC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from orders.v1 import event_stream_service_pb2, event_stream_service_pb2_grpc

from domain.events import EVENT_TYPES
from server.errors import (
    bad_request_status,
    plain_status,
    status_for,
    unexpected_error_status,
)
from server.subscription_hub import (
    EventFilter,
    HubClosedError,
    SubscriptionHub,
    TooManySubscribersError,
)


def request_violations(
    request: event_stream_service_pb2.SubscribeRequest,
) -> list[tuple[str, str]]:
    known = ", ".join(EVENT_TYPES)
    return [
        (f"event_types[{n}]", f"unknown event type {name!r}; known types: {known}")
        for n, name in enumerate(request.event_types)
        if name not in EVENT_TYPES
    ]


class EventStreamServicer(event_stream_service_pb2_grpc.EventStreamServiceServicer):
    def __init__(self, hub: SubscriptionHub) -> None:
        self._hub = hub

    async def Subscribe(
        self,
        request: event_stream_service_pb2.SubscribeRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[event_stream_service_pb2.SubscribeResponse]:
        violations = request_violations(request)
        if violations:
            await context.abort_with_status(bad_request_status(violations))
        event_filter = EventFilter(frozenset(request.event_types), request.stream_id)
        # Context state is touched only before streaming starts and on our own errors,
        # never after a client cancellation: in grpcio 1.85, reading it then crashed the
        # process with a segfault.
        try:
            async with self._hub.subscribe(
                event_filter, request.after_position, request.from_end
            ) as subscription:
                async for response in subscription.responses():
                    yield response
        except Exception as error:
            # Not abort_with_status: the client may already be gone (a shutdown racing a
            # disconnect), and a failed abort would surface as an error of its own.
            # Setting the status and returning lets grpc send it if anyone is listening.
            status = _failure(error)
            context.set_trailing_metadata(status.trailing_metadata)
            context.set_code(status.code)
            context.set_details(status.details)


def _failure(error: Exception) -> grpc.Status:
    if isinstance(error, TooManySubscribersError):
        return plain_status(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open subscriptions, retry later"
        )
    if isinstance(error, HubClosedError):
        return plain_status(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
    return status_for(error) or unexpected_error_status(error)
