"""``EventStreamService/Subscribe``: validates the request and streams a hub subscription.

The delivery logic (catch-up, handoff, live fan-out, checkpoints) lives in
``server.rpc.subscription_hub``; this module maps requests and failures to gRPC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from orders.v1 import event_stream_service_pb2, event_stream_service_pb2_grpc

from domain.events import EVENT_TYPES
from domain.streams import recorded_stream_id
from server.rpc.status_mapping import bad_request_status
from server.rpc.subscription_hub import EventFilter, SubscriptionHub


def request_violations(
    request: event_stream_service_pb2.SubscribeRequest,
) -> list[tuple[str, str]]:
    known = ", ".join(EVENT_TYPES)
    violations = [
        (f"event_types[{n}]", f"unknown event type {name!r}; known types: {known}")
        for n, name in enumerate(request.event_types)
        if name not in EVENT_TYPES
    ]
    if request.stream_id:
        try:
            recorded_stream_id(request.stream_id)
        except ValueError as error:
            violations.append(("stream_id", str(error)))
    return violations


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
        stream_id = recorded_stream_id(request.stream_id) if request.stream_id else ""
        event_filter = EventFilter(frozenset(request.event_types), stream_id)
        # Context state is touched only before streaming starts, never after a client
        # cancellation (that crashed grpcio 1.85). A failure (too many subscribers, the
        # server stopping, the store) escapes to the last-resort handler, which maps it.
        async with self._hub.subscribe(
            event_filter, request.after_position, request.from_end
        ) as subscription:
            async for response in subscription.responses():
                yield response
