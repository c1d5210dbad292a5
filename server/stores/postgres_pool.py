"""Pooled PostgreSQL connections that the server has not closed meanwhile.

A connection sits idle in the pool (or kept by a writer) for as long as nothing needs it.
If PostgreSQL closes it meanwhile (a restart or a failover that is over by now,
``pg_terminate_backend``, ``idle_session_timeout``, a proxy's idle limit), nothing tells
the pool: the next statement sent on it fails, and so did the call that sent it. After
every connection of a gateway was terminated, 6 of the next 20 CreateOrder calls one after
the other and 7 of 32 sent at once were answered UNAVAILABLE, with the database up all the
time.

The server says it is closing a connection: it sends an error ("terminating connection
due to administrator command") and closes the socket, a while later on a busy server. So
a connection whose socket is readable while it is idle is read without waiting (one
``poll``, about a microsecond) and dropped if the server closed it or sent that error; a
connection checked out of the pool, or kept from one statement to the next, is checked
so before it is used. psycopg_pool's own ``check`` callback would have done for the pool,
but the pool sleeps a second before the next attempt after a connection fails its check,
and its ``check_connection`` costs a round trip per checkout.

A server that vanishes without closing its sockets (a host lost, a network cut) cannot be
told apart this way: its connections fail when used, as before.
"""

from __future__ import annotations

import select
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg.errors import Diagnostic
from psycopg.pq import ConnStatus
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

Connection = psycopg.AsyncConnection[TupleRow]

_CLOSING = frozenset({"FATAL", "PANIC"})
"""Severities of an error after which the server closes the session."""

_MOST_READS = 4
"""Reads of an idle connection before it is taken for closed: a closing server sends one
message and the end of the stream, anything else a handful at most."""


def closed_by_server(connection: Connection) -> bool:
    """Whether PostgreSQL has closed ``connection``, or announced it will, which must be
    idle (no statement in flight); reads what the server sent meanwhile, without waiting."""
    if connection.closed:
        return True
    pgconn = connection.pgconn
    # poll, not select: a busy server's sockets get descriptors above select's 1,024.
    poller = select.poll()
    try:
        poller.register(pgconn.socket, select.POLLIN)
    except (OSError, ValueError, psycopg.OperationalError):
        return True
    if not poller.poll(0):
        return pgconn.status != ConnStatus.OK
    # Readable while idle, which is rare: libpq hands an error that reaches an idle
    # session to the notice handlers, and a FATAL one is the server saying it closes the
    # connection, which a busy server does a while after (a statement sent meanwhile
    # failed: terminating connection).
    ending: list[Diagnostic] = []

    def on_notice(diagnostic: Diagnostic) -> None:
        if diagnostic.severity_nonlocalized in _CLOSING:
            ending.append(diagnostic)

    connection.add_notice_handler(on_notice)
    try:
        for _ in range(_MOST_READS):
            try:
                # Reads what arrived, failing on the end of the stream; ``is_busy`` has
                # libpq parse it (the error that announces the close, a notice).
                pgconn.consume_input()
                pgconn.is_busy()
            except psycopg.OperationalError:
                return True
            if ending:
                return True
            if not poller.poll(0):
                return pgconn.status != ConnStatus.OK
        return True
    finally:
        connection.remove_notice_handler(on_notice)


class LiveConnectionPool(AsyncConnectionPool[Connection]):
    """An ``AsyncConnectionPool`` whose ``getconn`` (and so ``connection``) never gives out
    a connection the server has closed: such a one is dropped, the pool opens another in
    the background, and the next idle one is tried, within the same timeout."""

    async def getconn(self, timeout: float | None = None) -> Connection:  # noqa: ASYNC109 - the base class's signature
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            connection = await super().getconn(max(0.0, deadline - time.monotonic()))
            if not closed_by_server(connection):
                return connection
            # Given back closed, so the pool discards it and opens a replacement.
            await connection.close()
            await self.putconn(connection)
            if time.monotonic() >= deadline:
                raise PoolTimeout(f"couldn't get a connection after {wait:.2f} sec")


def connection_pool(
    url: str,
    connect_kwargs: dict[str, Any],
    timeout: float,
    name: str,
    configure: Callable[[Connection], Awaitable[None]],
    min_size: int,
    max_size: int,
) -> LiveConnectionPool:
    """A pool of autocommit connections, not yet open; a wait for one beyond ``timeout``
    fails."""
    return LiveConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        # psycopg_pool retries a failed connection with a doubling delay until this
        # timeout (default 5 min), and nothing else connects meanwhile: after a 90 s
        # outage the first call worked 37 s after the database was back. With the chain
        # cut at the pool's timeout, the next call that waits starts a new one.
        reconnect_timeout=timeout,
        kwargs={"autocommit": True, **connect_kwargs},
        configure=configure,
        open=False,
        name=name,
    )
