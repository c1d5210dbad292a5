"""``order-gateway group …`` and ``order-gateway consume``: consumer groups from a shell.

``group`` prints what the server answers as JSON (one line per group; ``delete``, whose
answer is empty, ``{"deleted": NAME}``); ``consume`` joins a
group and prints each delivery as a JSON line on stdout, acking the event once its line
is written and flushed, so a consumer piping it on gets every event at least once.
Assignments go to stderr. Plain synchronous clients, like ``tail``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

import grpc
from google.protobuf import duration_pb2
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc

from server.client.channel import (
    Metadata,
    call_metadata,
    connection_settles,
    no_connection,
    open_channel,
)
from server.client.ctrl_c import CtrlC, ctrl_c_stops
from server.client.environment import EnvironmentParser
from server.client.json_lines import json_line
from server.client.output import (
    ReaderGone,
    closed_output,
    reader_gone_error,
    unwritable_output,
)
from server.client.tail import field_violations
from server.config import variable_name

LISTEN_VARIABLE = variable_name("listen")
MAX_DURATION_SECONDS = 315_576_000_000
"""The longest ``google.protobuf.Duration``: about 10,000 years."""


CALL_TIMEOUT = 10.0
"""Seconds a ``group`` command waits for its answer by default."""

LIST_PAGE_SIZE = 100
"""Groups ``group list`` asks for in each call: each page is printed as it comes, and no
answer nears gRPC's message size limits (a group of 256 partitions takes about 2 KB)."""


def add_client_flags(parser: argparse.ArgumentParser, target: str = "the gateway to call") -> None:
    """``--target``, ``--token`` and ``--tls-ca``, as every client command takes them.

    ``--target`` is left None when not given: the command line's settings decide it
    (``server.cli``: the address of ``ORDER_GATEWAY_LISTEN``, a wildcard host read as
    loopback)."""
    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        type=target_address,
        help=f"{target} (default: the address of {LISTEN_VARIABLE}, a wildcard host read"
        " as loopback, or 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        help="the bearer token to send, for a gateway with authentication on (default: none)",
    )
    add_tls_flags(parser)


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    """``--tls-ca`` and ``--tls-server-name``, as every command that calls a gateway
    takes them."""
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="the CA certificate (PEM) to trust, for a gateway that speaks TLS "
        "(default: plaintext)",
    )
    parser.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="with --tls-ca: the name the gateway's certificate must hold (default: the "
        "target's host), for a certificate that does not name the address called",
    )


def add_parsers(commands: argparse._SubParsersAction[EnvironmentParser]) -> None:
    group = commands.add_parser(
        "group",
        help="create, list, inspect and delete consumer groups, and replay their parked events",
        description="Manage consumer groups (docs/consumer-groups.md); answers print as JSON. "
        "A failed call exits 1 with its status.",
    )
    actions = group.add_subparsers(dest="group_command", required=True)
    create = actions.add_parser(
        "create",
        help="create a group (or confirm it exists with these settings)",
        description="Create a consumer group and print it; a group of that name with equal "
        "settings is printed as it is, with other settings the call fails.",
    )
    create.add_argument("name", help="1 to 64 characters of A-Z a-z 0-9 . _ -")
    create.add_argument(
        "--partitions",
        metavar="N",
        type=whole_number(32),
        default=0,
        help="1 to 256 (0: 16): the most members that work at once (default: 16)",
    )
    create.add_argument(
        "--type",
        metavar="NAME",
        action="append",
        default=[],
        dest="types",
        help="deliver only events of this type, e.g. OrderCreated; repeat it for several "
        "types (default: every type)",
    )
    start = create.add_mutually_exclusive_group()
    start.add_argument(
        "--after",
        metavar="N",
        type=whole_number(64),
        default=0,
        help="start after this position (default: 0, from the first event)",
    )
    start.add_argument(
        "--from-end", action="store_true", help="start at the head: only events from now on"
    )
    create.add_argument(
        "--ack-timeout",
        metavar="SECONDS",
        type=_seconds,
        help="1 to 3600: a delivery not acked within it is delivered again (default: 30)",
    )
    create.add_argument(
        "--max-deliveries",
        metavar="N",
        type=whole_number(32),
        default=0,
        help="1 to 100 (0: 5): failed deliveries before an event is parked (default: 5)",
    )
    _add_call_flags(create)
    listing = actions.add_parser("list", help="print every group, one JSON line each")
    _add_call_flags(listing)
    for name, what in (
        ("info", "print one group: checkpoints, members, partitions, in flight, parked"),
        (
            "delete",
            'delete a group with its checkpoints and parked events; prints {"deleted": NAME}',
        ),
    ):
        action = actions.add_parser(name, help=what)
        action.add_argument("name", help="the group")
        _add_call_flags(action)
    replay = actions.add_parser(
        "replay-parked", help="return the longest-parked events to delivery, at attempt 1"
    )
    replay.add_argument("name", help="the group")
    replay.add_argument(
        "--limit",
        metavar="N",
        type=whole_number(32),
        default=0,
        help="how many (default: 0, all)",
    )
    _add_call_flags(replay)

    consume = commands.add_parser(
        "consume",
        help="join a consumer group and print its deliveries as JSON lines",
        description="Join a consumer group as a member and print each delivery as one JSON "
        "line, acking the event once its line is written; partitions assigned are reported "
        "on stderr. Ctrl-C leaves the group; a failed call exits 1 with its status.",
    )
    consume.add_argument("--group", metavar="NAME", required=True, help="the group to join")
    consume.add_argument(
        "--member",
        metavar="ID",
        default="",
        help="this member's id, unique among the group's connected members "
        "(default: one the server picks)",
    )
    add_client_flags(consume)
    add_connection_timeout(consume)


def add_connection_timeout(parser: argparse.ArgumentParser) -> None:
    """``--timeout`` of a command that follows a stream: the wait for the connection."""
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=positive_seconds,
        default=CALL_TIMEOUT,
        help="how long to wait for a connection to the gateway that does not answer "
        "(default: %(default)s); past it the command fails with DEADLINE_EXCEEDED, and a "
        "refused connection fails at once with UNAVAILABLE. Once connected, the stream "
        "has no deadline",
    )


def _add_call_flags(parser: argparse.ArgumentParser) -> None:
    """The client flags, and the deadline of a ``group`` command's one call."""
    add_client_flags(parser)
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=positive_seconds,
        default=CALL_TIMEOUT,
        help="how long to wait for the answer (default: %(default)s); past it the command "
        "fails with DEADLINE_EXCEEDED",
    )


MAX_TIMEOUT_SECONDS = 100_000_000
"""The longest ``--timeout``, about three years: grpc's deadline overflows past some
9,000,000,000 s from now, and a call with such a timeout failed at once (DEADLINE_EXCEEDED)."""


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0, at most ``MAX_TIMEOUT_SECONDS``."""
    seconds = _number_of_seconds(text)
    if not 0 < seconds <= MAX_TIMEOUT_SECONDS:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds above 0 and at most {MAX_TIMEOUT_SECONDS:,}: {text!r}"
        )
    return seconds


def target_address(text: str) -> str:
    """An argparse type: the gateway to call, as grpc names a target (``HOST:PORT``,
    ``[IPV6]:PORT``, ``dns:///HOST:PORT``, ``unix:PATH`` …), with a port not past 65535:
    grpc would call that port modulo 65536, another server, or the right one by chance."""
    if text.startswith(("unix:", "unix-abstract:")):
        return text  # a socket's name: no port
    host, separator, port = text.rpartition(":")
    if not separator or not host or not (port.isascii() and port.isdigit()):
        # grpc would call port 443 of a target without one, and fail an empty one only
        # as it connects, after log lines of its own.
        raise argparse.ArgumentTypeError(f"not HOST:PORT or [IPv6]:PORT: {text!r}")
    if int(port) > 65535:
        raise argparse.ArgumentTypeError(f"the port must be from 0 to 65535: {text!r}")
    return text


def _number_of_seconds(text: str) -> float:
    # float() also takes "1_0" and other scripts' digits, as int() does.
    if text.isascii() and "_" not in text:
        with contextlib.suppress(ValueError):
            return float(text)
    raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")


def _fail(program: str, error: grpc.RpcError, err: TextIO) -> int:
    assert isinstance(error, grpc.Call)
    print(f"{program}: {error.code().name}: {error.details()}", file=err)
    for field, reason in field_violations(error):
        print(f"  {field}: {reason}", file=err)
    return 1


def _seconds(text: str) -> float:
    """A number of seconds a ``google.protobuf.Duration`` can hold (the server checks the
    range it accepts); anything else, ``inf`` or ``1e300``, is a usage error."""
    seconds = _number_of_seconds(text)
    if not abs(seconds) <= MAX_DURATION_SECONDS:  # also refuses nan
        raise argparse.ArgumentTypeError(f"not a number of seconds a Duration holds: {text!r}")
    return seconds


def whole_number(bits: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 0 to what an unsigned ``bits``-bit proto field
    holds (the server checks the range it accepts); anything else is a usage error."""
    largest = 2**bits - 1

    def parse(text: str) -> int:
        # int() also takes "3_810", " 38 ", "+38" and other scripts' digits (Arabic-Indic
        # ones): a typo, or a pasted value, read as a number nobody meant.
        if not (text.isascii() and text.isdigit()):
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
        number = int(text)
        if not 0 <= number <= largest:
            raise argparse.ArgumentTypeError(f"must be from 0 to {largest}")
        return number

    return parse


def _settings(args: argparse.Namespace) -> pb.ConsumerGroupSettings:
    settings = pb.ConsumerGroupSettings(
        event_types=args.types,
        start_after_position=args.after,
        start_from_end=args.from_end,
        partitions=args.partitions,
        max_deliveries=args.max_deliveries,
    )
    if args.ack_timeout is not None:
        timeout = duration_pb2.Duration()
        timeout.FromNanoseconds(round(args.ack_timeout * 1e9))
        settings.ack_timeout.CopyFrom(timeout)
    return settings


def _every_group(
    stub: pb_grpc.ConsumerGroupServiceStub, metadata: Metadata, timeout: float
) -> Iterator[pb.ConsumerGroup]:
    """Every group, a page at a time, all within ``timeout`` seconds. A gateway that
    does not page answers every group in its first answer, with no next page."""
    deadline = time.monotonic() + timeout
    token = ""
    while True:
        listed = stub.ListConsumerGroups(
            pb.ListConsumerGroupsRequest(page_size=LIST_PAGE_SIZE, page_token=token),
            metadata=metadata,
            timeout=max(deadline - time.monotonic(), 0.0),
        )
        yield from listed.groups
        token = listed.next_page_token
        if not token:
            return


def run_group(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    program = f"order-gateway group {args.group_command}"
    metadata = call_metadata(args.token)
    timeout = args.timeout
    with open_channel(args.target, args.tls_ca, args.tls_server_name) as channel:
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        try:
            command = args.group_command
            if command == "create":
                request = pb.CreateConsumerGroupRequest(name=args.name, settings=_settings(args))
                created = stub.CreateConsumerGroup(request, metadata=metadata, timeout=timeout)
                print(json_line(created.group), file=out)
            elif command == "list":
                for found in _every_group(stub, metadata, timeout):
                    print(json_line(found), file=out)
            elif command == "info":
                got = stub.GetConsumerGroup(
                    pb.GetConsumerGroupRequest(name=args.name), metadata=metadata, timeout=timeout
                )
                print(json_line(got.group), file=out)
            elif command == "delete":
                stub.DeleteConsumerGroup(
                    pb.DeleteConsumerGroupRequest(name=args.name),
                    metadata=metadata,
                    timeout=timeout,
                )
                # The answer is empty: confirm what went, as a JSON line like the others.
                print(json.dumps({"deleted": args.name}), file=out)
            else:
                replayed = stub.ReplayParked(
                    pb.ReplayParkedRequest(name=args.name, limit=args.limit),
                    metadata=metadata,
                    timeout=timeout,
                )
                print(json_line(replayed), file=out)
        except grpc.RpcError as error:
            return _fail(program, error, err)
    return 0


LEAVE_SECONDS = 5.0
"""How long a ``consume`` whose reader went away waits for the server to take its last
acks and end the call, before it cancels the call."""


def assignment_line(assignment: pb.Assignment, had_partitions: bool) -> str:
    """What ``consume`` says of an Assignment; ``had_partitions``: an earlier one named
    some.

    One naming none before any did is not called a standby: on PostgreSQL (and with
    ``--workers``) the server answers the join before the group's partitions are shared
    out, and one naming the member's follows at once, unless the group has more members
    than partitions; the messages do not tell which. Once partitions were taken away,
    the member stands by until some come back."""
    if assignment.partitions:
        partitions = ", ".join(map(str, assignment.partitions))
    else:
        partitions = "none (standby)" if had_partitions else "none yet"
    return f"member {assignment.member_id} has partitions {partitions}"


def follow_group(
    channel: grpc.Channel,
    group: str,
    member_id: str,
    out: TextIO,
    err: TextIO,
    metadata: Metadata = (),
    ctrl_c: CtrlC | None = None,
) -> int:
    """Consume until the server ends the stream (0), it fails (1) or Ctrl-C (0: ``ctrl_c``
    cancels the call)."""
    program = "order-gateway consume"
    requests: queue.SimpleQueue[pb.ConsumeRequest | None] = queue.SimpleQueue()
    # One delivery at a time: the next comes once the line before it is written and acked.
    # A reader that goes away (| head) then leaves at most one delivery unwritten, which
    # counts as one failed attempt: with the server's default (100 in flight), each such
    # run failed every delivery it held, and a few runs parked events nobody had seen.
    join = pb.Join(group=group, member_id=member_id, max_in_flight=1)
    requests.put(pb.ConsumeRequest(join=join))

    def outgoing() -> Iterator[pb.ConsumeRequest]:
        while (request := requests.get()) is not None:
            yield request

    stub = pb_grpc.ConsumerGroupServiceStub(channel)
    call = stub.Consume(outgoing(), metadata=metadata)
    if ctrl_c is not None:
        ctrl_c.stops(call.cancel)

    writing = threading.Lock()
    """Held from a line's write until its ack is queued: the end of the requests that
    ``leave`` queues from the watcher's thread cannot come between them."""

    def leave() -> None:
        # Half-close, not cancel: the acks queued for lines already written are sent
        # first, and the server ends the call once it has applied them (the member
        # leaves). Cancelled, the call would drop them, and those events would come back.
        with writing:
            requests.put(None)
        timer = threading.Timer(LEAVE_SECONDS, call.cancel)
        timer.daemon = True
        timer.start()

    reader_gone = ReaderGone(out, leave)
    broken_pipe = False
    had_partitions = False
    try:
        for response in call:
            if reader_gone or broken_pipe:
                continue  # Not written, so not acked: it goes back to the group.
            if response.WhichOneof("message") == "delivery":
                with writing:
                    if reader_gone:
                        continue
                    try:
                        out.write(json_line(response.delivery) + "\n")
                        out.flush()
                    except BrokenPipeError:
                        broken_pipe = True
                    else:
                        # Written and flushed: only now is the event done, as far as we
                        # can tell.
                        event_ids = [response.delivery.event.event_id]
                        requests.put(pb.ConsumeRequest(ack=pb.Ack(event_ids=event_ids)))
                if broken_pipe:
                    # The reader went away before the watcher told: leave as it would.
                    leave()
            else:
                assignment = response.assignment
                print(f"{program}: {assignment_line(assignment, had_partitions)}", file=err)
                had_partitions = had_partitions or bool(assignment.partitions)
    except grpc.RpcError as error:
        # The failed call, raised by itself, in a cycle with its traceback: freed here,
        # not by the interpreter's last collection (``server.client.tail.follow``).
        error.__traceback__ = None
        if ctrl_c is not None and ctrl_c.pressed:
            return 0
        if reader_gone or broken_pipe:
            raise reader_gone_error() from None
        return _fail(program, error, err)
    except OSError:
        # The line was not written, so its event is not acked: it goes back to the group.
        call.cancel()
        raise
    finally:
        requests.put(None)
    if reader_gone or broken_pipe:
        raise reader_gone_error()
    return 0


def consume(args: argparse.Namespace) -> int:
    """Ctrl-C stops it with status 0, while it still waits for its connection as once it
    consumes."""
    if (status := closed_output("order-gateway consume")) is not None:
        return status
    try:
        with (
            ctrl_c_stops() as ctrl_c,
            open_channel(args.target, args.tls_ca, args.tls_server_name) as channel,
        ):
            settled = connection_settles(channel, args.timeout, ctrl_c)
            if ctrl_c.pressed:
                return 0
            if not settled:
                message = no_connection(args.target, args.timeout)
                print(f"order-gateway consume: {message}", file=sys.stderr)
                return 1
            try:
                return follow_group(
                    channel,
                    args.group,
                    args.member,
                    sys.stdout,
                    sys.stderr,
                    call_metadata(args.token),
                    ctrl_c,
                )
            except OSError as error:
                return unwritable_output("order-gateway consume", error)
    except KeyboardInterrupt:
        # Pressed before ``ctrl_c_stops`` took SIGINT over, or after it gave it back.
        return 0
