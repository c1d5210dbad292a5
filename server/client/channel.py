"""Channels and credentials for the CLI's client commands (tail, group, consume, health)."""

from __future__ import annotations

import threading
import time
from types import TracebackType

import grpc

from server.client.ctrl_c import CtrlC
from server.config import read_setting_file

TOKEN_VARIABLE = "ORDER_GATEWAY_TOKEN"
TLS_CA_VARIABLE = "ORDER_GATEWAY_TLS_CA"
TLS_SERVER_NAME_VARIABLE = "ORDER_GATEWAY_TLS_SERVER_NAME"

Metadata = tuple[tuple[str, str], ...]


RECEIVE_LIMIT = 256 * 1024 * 1024
"""The largest answer the CLI reads: a gateway that does not page ``ListConsumerGroups``
answers every group in one message (about 2 KB for a group of 256 partitions), past
gRPC's default 4 MiB from a few thousand groups."""

_OPTIONS = (("grpc.max_receive_message_length", RECEIVE_LIMIT),)


def open_channel(target: str, tls_ca: str | None, server_name: str | None = None) -> grpc.Channel:
    """Plaintext, or TLS trusting the CA certificate(s) in the PEM file ``tls_ca``, and
    checking that the server's certificate names ``server_name`` (default: the target's
    host), as grpcurl's ``-servername`` does."""
    if tls_ca is None:
        if server_name is not None:
            raise ValueError(
                f"--tls-server-name ({TLS_SERVER_NAME_VARIABLE}) is for a gateway that speaks"
                f" TLS: give --tls-ca ({TLS_CA_VARIABLE}) too"
            )
        return grpc.insecure_channel(target, options=_OPTIONS)
    # Named by its flag and its variable, either of which may have set it.
    option = f"--tls-ca ({TLS_CA_VARIABLE})"
    roots = read_setting_file(option, tls_ca)
    if b"-----BEGIN CERTIFICATE-----" not in roots:
        raise ValueError(f"{option} {tls_ca}: no PEM certificate in it")
    options: tuple[tuple[str, int | str], ...] = _OPTIONS
    if server_name is not None:
        if not _host_name(server_name):
            raise ValueError(
                f"--tls-server-name ({TLS_SERVER_NAME_VARIABLE}) {server_name!r}: not a host name"
            )
        options = (*_OPTIONS, ("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(
        target, grpc.ssl_channel_credentials(root_certificates=roots), options=options
    )


def _host_name(name: str) -> bool:
    """Whether ``name`` can be a TLS server name: at most 253 characters (a trailing dot
    aside), in labels of 1 to 63 without spaces. grpc refuses longer ones only as it
    connects, with a log line of its own."""
    labels = name.removesuffix(".").split(".")
    return (
        len(name.removesuffix(".")) <= 253
        and all(0 < len(label) <= 63 for label in labels)
        and not any(c.isspace() for c in name)
    )


def call_metadata(token: str | None) -> Metadata:
    """``authorization: Bearer`` with ``--token`` (or ``ORDER_GATEWAY_TOKEN``), else none.

    Sent as call metadata rather than call credentials, so that it also reaches a
    server listening in plaintext on loopback."""
    token = (token or "").strip()
    if not all(" " <= character <= "~" for character in token):
        # gRPC metadata carries printable ASCII only: grpc would fail the call as INTERNAL.
        raise ValueError(f"--token (or {TOKEN_VARIABLE}): a token is printable ASCII only")
    return (("authorization", f"Bearer {token}"),) if token else ()


SETTLED = (
    grpc.ChannelConnectivity.READY,
    grpc.ChannelConnectivity.TRANSIENT_FAILURE,
    grpc.ChannelConnectivity.SHUTDOWN,
)


SETTLE_POLL_SECONDS = 0.05
"""How often ``connection_settles`` looks whether the connection settled, and so how late
at most it sees a Ctrl-C."""


def connection_settles(channel: grpc.Channel, timeout: float, ctrl_c: CtrlC | None = None) -> bool:
    """Whether ``channel`` connects, or fails to, within ``timeout`` seconds; False at
    once if ``ctrl_c`` is pressed.

    A stream without a deadline (tail, consume) started on a channel still connecting
    waits as long as the connection does: for ever, on a peer that accepts TCP and never
    speaks HTTP/2. Once this returns True the call can start: it fails at once with the
    connection's error if there is one.

    It looks every ``SETTLE_POLL_SECONDS`` rather than blocking once for the whole
    ``timeout``: the kernel hands a Ctrl-C to any thread of the process that does not block
    SIGINT, grpc's own threads included (9 of 50 Ctrl-Cs of a waiting ``tail`` or
    ``consume``). Python's handler then runs only when the main thread next runs Python
    code: blocked in one long wait, it did so only once grpc gave up connecting, 20 s
    later."""
    settled = threading.Event()

    def watch(state: grpc.ChannelConnectivity) -> None:
        if state in SETTLED:
            settled.set()

    threading.excepthook = quiet_polling_of_closed_channels
    channel.subscribe(watch, try_to_connect=True)
    deadline = time.monotonic() + timeout
    try:
        while not settled.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or (ctrl_c is not None and ctrl_c.pressed):
                return False
            time.sleep(min(left, SETTLE_POLL_SECONDS))
        return True
    finally:
        channel.unsubscribe(watch)


def quiet_polling_of_closed_channels(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook``, but for grpc's connectivity polling failing on a closed
    channel. After the last ``unsubscribe`` that thread goes on watching for up to 0.2 s,
    and a channel closed meanwhile (a Ctrl-C while the command waits for its connection)
    makes it raise ``ValueError: Cannot monitor channel state: Channel closed!``: nothing
    is lost, and its traceback would be all the command printed."""
    if args.exc_type is ValueError and _raised_in(args.exc_traceback, "_poll_connectivity"):
        return
    threading.__excepthook__(args)


def _raised_in(traceback: TracebackType | None, function: str) -> bool:
    while traceback is not None:
        if traceback.tb_frame.f_code.co_name == function:
            return True
        traceback = traceback.tb_next
    return False


def no_connection(target: str, timeout: float) -> str:
    """What a stream command prints when ``connection_settles`` says no."""
    return f"DEADLINE_EXCEEDED: no connection to {target} within {timeout:g} s"
