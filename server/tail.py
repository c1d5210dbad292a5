"""``order-gateway tail``: print committed events as JSON lines, for people watching by hand."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

import grpc
from google.protobuf import json_format
from orders.v1 import event_stream_service_pb2, event_stream_service_pb2_grpc


def subscribe_request(
    after: int, types: Sequence[str]
) -> event_stream_service_pb2.SubscribeRequest:
    return event_stream_service_pb2.SubscribeRequest(after_position=after, event_types=list(types))


def print_events(responses: object, out: TextIO = sys.stdout) -> int:
    """Write each event of a Subscribe response stream as one JSON line; return how many."""
    count = 0
    for response in responses:  # type: ignore[attr-defined]
        if response.HasField("event"):
            out.write(json_format.MessageToJson(response.event, indent=None) + "\n")
            out.flush()
            count += 1
    return count


async def tail(target: str, after: int, types: Sequence[str]) -> int:
    """Follow the event stream of the gateway at ``target`` until interrupted."""
    with grpc.insecure_channel(target) as channel:
        stub = event_stream_service_pb2_grpc.EventStreamServiceStub(channel)
        try:
            print_events(stub.Subscribe(subscribe_request(after, types)))
        except grpc.RpcError as error:
            print(f"order-gateway tail: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
    return 0
