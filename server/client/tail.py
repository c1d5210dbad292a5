"""``order-gateway tail``: print committed events as JSON lines, for people watching by hand.

A plain synchronous client: one blocking stream, one line per event, flushed at once so
the output can be piped. Checkpoints are progress markers for programs, not shown.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from orders.v1 import event_stream_service_pb2, event_stream_service_pb2_grpc

from server.client.channel import (
    Metadata,
    call_metadata,
    connection_settles,
    no_connection,
    open_channel,
)
from server.client.ctrl_c import CtrlC, ctrl_c_stops
from server.client.json_lines import json_line
from server.client.output import (
    ReaderGone,
    closed_output,
    reader_gone_error,
    unwritable_output,
)

PROGRAM = "order-gateway tail"


def subscribe_request(
    after: int, types: Sequence[str], stream: str = ""
) -> event_stream_service_pb2.SubscribeRequest:
    return event_stream_service_pb2.SubscribeRequest(
        after_position=after, event_types=list(types), stream_id=stream
    )


def follow(
    channel: grpc.Channel,
    after: int,
    types: Sequence[str],
    out: TextIO,
    err: TextIO,
    metadata: Metadata = (),
    stream: str = "",
    ctrl_c: CtrlC | None = None,
) -> int:
    """Print the events of one Subscribe call on ``channel``; the exit status.

    0 when the server ends the stream or on Ctrl-C (``ctrl_c`` cancels the call); 1
    (with the reason on ``err``) when the call fails.
    """
    stub = event_stream_service_pb2_grpc.EventStreamServiceStub(channel)
    call = stub.Subscribe(subscribe_request(after, types, stream), metadata=metadata)
    if ctrl_c is not None:
        ctrl_c.stops(call.cancel)
    reader_gone = ReaderGone(out, call.cancel)
    try:
        for response in call:
            if response.HasField("event"):
                out.write(json_line(response.event) + "\n")
                out.flush()
    except grpc.RpcError as error:
        # grpc raises the failed call itself, and its traceback holds the frame that
        # raised it, whose `self` is the call: a reference cycle that, left alone, only
        # the interpreter's last collection frees. The call's finalizer then waits for the
        # call's lock, which a grpc daemon thread, stopped by then wherever it was, may
        # hold for good, and the process never ends. Without the traceback, the call is
        # freed with this frame, while grpc's threads still run.
        error.__traceback__ = None
        if ctrl_c is not None and ctrl_c.pressed:
            return 0
        if reader_gone:
            raise reader_gone_error() from None
        print(f"{PROGRAM}: {error.code().name}: {error.details()}", file=err)
        for field, reason in field_violations(call):
            print(f"  {field}: {reason}", file=err)
        return 1
    except OSError:
        # Output that cannot be written: the reader went away (e.g. `| head`), or a full
        # disk. The caller says which.
        call.cancel()
        raise
    return 0


def field_violations(call: grpc.Call) -> list[tuple[str, str]]:
    """What the server's BadRequest detail says is wrong with the request, field by field
    (the status message alone only names the fields)."""
    status = rpc_status.from_call(call)
    violations: list[tuple[str, str]] = []
    for detail in status.details if status is not None else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations += [(v.field, v.description) for v in bad_request.field_violations]
    return violations


def tail(
    target: str,
    after: int,
    types: Sequence[str],
    token: str | None = None,
    tls_ca: str | None = None,
    stream: str = "",
    timeout: float = 10.0,
    tls_server_name: str | None = None,
) -> int:
    """Follow the event stream of the gateway at ``target`` until interrupted (one stream's
    events only, with ``stream``), once connected within ``timeout`` seconds.

    Ctrl-C stops it with status 0, while it still waits for its connection as once it
    follows."""
    if after < 0:
        print(f"{PROGRAM}: --after must be 0 or more", file=sys.stderr)
        return 2
    if (status := closed_output(PROGRAM)) is not None:
        return status
    try:
        with ctrl_c_stops() as ctrl_c, open_channel(target, tls_ca, tls_server_name) as channel:
            settled = connection_settles(channel, timeout, ctrl_c)
            if ctrl_c.pressed:
                return 0
            if not settled:
                print(f"{PROGRAM}: {no_connection(target, timeout)}", file=sys.stderr)
                return 1
            try:
                return follow(
                    channel,
                    after,
                    types,
                    sys.stdout,
                    sys.stderr,
                    call_metadata(token),
                    stream,
                    ctrl_c,
                )
            except OSError as error:
                return unwritable_output(PROGRAM, error)
    except KeyboardInterrupt:
        # Pressed before ``ctrl_c_stops`` took SIGINT over, or after it gave it back.
        return 0
