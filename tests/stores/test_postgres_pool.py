"""``closed_by_server`` against a stand-in for PostgreSQL that speaks just enough of its
protocol to be connected to, so that what arrives, and when, is the test's to choose."""

from __future__ import annotations

import asyncio
import select
import struct
from collections.abc import AsyncIterator

import psycopg
import pytest

from server.stores.postgres_pool import closed_by_server

TIMEOUT = 10.0


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _error(severity: str, code: str, text: str) -> bytes:
    fields = b"".join(
        tag + value.encode() + b"\0"
        for tag, value in ((b"S", severity), (b"V", severity), (b"C", code), (b"M", text))
    )
    return _message(b"E", fields + b"\0")


READY = b"".join(
    [
        _message(b"R", struct.pack("!i", 0)),  # AuthenticationOk
        *(
            _message(b"S", name + b"\0" + value + b"\0")
            for name, value in (
                (b"server_version", b"15.0"),
                (b"client_encoding", b"UTF8"),
                (b"server_encoding", b"UTF8"),
                (b"standard_conforming_strings", b"on"),
                (b"integer_datetimes", b"on"),
                (b"DateStyle", b"ISO, MDY"),
            )
        ),
        _message(b"K", struct.pack("!ii", 4242, 1)),  # BackendKeyData
        _message(b"Z", b"I"),  # ReadyForQuery, idle
    ]
)
"""What a server sends a client it lets in without a password."""

TERMINATING = _error("FATAL", "57P01", "terminating connection due to administrator command")
"""What a backend sends before it closes the socket (``pg_terminate_backend``)."""


class StandIn:
    """Accepts one connection, lets it in, then sends what the test says, when it says."""

    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (length,) = struct.unpack("!i", await reader.readexactly(4))
        await reader.readexactly(length - 4)  # the startup message
        writer.write(READY)
        await writer.drain()
        self.writer = writer
        self.connected.set()

    async def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()


@pytest.fixture
async def stand_in() -> AsyncIterator[StandIn]:
    server = StandIn()
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listening.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        if server.writer is not None:
            server.writer.close()
        listening.close()
        await listening.wait_closed()


async def _connected(stand_in: StandIn) -> psycopg.AsyncConnection[tuple[object, ...]]:
    connection = await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=stand_in.port, user="gateway", dbname="orders", sslmode="disable"
    )
    await asyncio.wait_for(stand_in.connected.wait(), TIMEOUT)
    return connection


async def _readable(connection: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    socket = connection.pgconn.socket
    for _ in range(int(TIMEOUT / 0.01)):
        if select.select([socket], [], [], 0)[0]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("nothing arrived")


async def test_an_idle_connection_is_kept(stand_in: StandIn) -> None:
    connection = await _connected(stand_in)
    assert not closed_by_server(connection)
    await connection.close()


async def test_a_connection_whose_server_announced_its_end_is_closed_before_the_socket_is(
    stand_in: StandIn,
) -> None:
    # A backend that is terminating has sent its FATAL error and not yet exited: the
    # socket is still open (a busy server takes a while between the two), and a
    # statement sent now fails.
    connection = await _connected(stand_in)
    await stand_in.send(TERMINATING)
    await _readable(connection)
    assert closed_by_server(connection)
    await connection.close()


async def test_a_notice_while_idle_does_not_close_the_connection(stand_in: StandIn) -> None:
    connection = await _connected(stand_in)
    notice = _message(
        b"N",
        b"SWARNING\0VWARNING\0C01000\0Mthe server says something\0\0",
    )
    await stand_in.send(notice)
    await _readable(connection)
    assert not closed_by_server(connection)
    await connection.close()
