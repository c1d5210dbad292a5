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

While the database refuses connections (stopped, restarting, its host unreachable), a
call that finds no idle connection fails at once (``DatabaseRefused``, which the store
answers STORE_UNAVAILABLE) instead of waiting the pool's whole timeout for a connection
that cannot come: with the timeout at 10 s, clients whose deadlines were shorter saw only
DEADLINE_EXCEEDED, and the store's fault was never reported. Calls already waiting fail as
the refusal comes. Once the last refusal is a second old, the next such call tries to
connect itself, so that the database's return is seen at once; from then on calls wait
for the pool's own connections again, and the pool makes them at once: its attempts to
replace the connections it lost wait 1, 2, 4 … s after each refusal, and a call that
found the database back waited for the next of them (3.2-3.5 s after a 3 s outage, in 1
run of 3 or 4), so the first connection that works, the pool's or a call's, brings them
forward.
"""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg.errors import Diagnostic
from psycopg.pq import ConnStatus
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from psycopg_pool.pool_async import AddConnection, MaintenanceTask

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


REFUSAL_FRESH: Final = 1.0
"""Seconds after a refused connection during which calls without an idle connection fail
at once; past them, one call tries to connect again before any fails."""

_REFUSING_SQLSTATES: Final = ("08", "57P")
"""Besides failures below the protocol (no SQLSTATE): connection exceptions, and a server
shutting down or starting up. Not a full server (too many connections: the connections in
use still work and come back) nor a refused login, which waiting cannot mend either way."""


class DatabaseRefused(psycopg.OperationalError):
    """The database refused a connection just now, and the pool has none idle. Not a
    ``PoolTimeout``: psycopg_pool re-raises those as "couldn't get a connection after
    10.00 sec", which it was not, and which points at the pool's size."""


@dataclass(frozen=True)
class _Refusal:
    at: float
    reason: str


def _refuses(error: Exception) -> bool:
    if not isinstance(error, psycopg.OperationalError):
        return False
    return error.sqlstate is None or error.sqlstate.startswith(_REFUSING_SQLSTATES)


class _Retry(MaintenanceTask):
    """The pool's next attempt to make a connection it lost, as it scheduled it, which
    ``now`` brings forward: it runs once, at whichever comes first."""

    def __init__(
        self,
        pool: LiveConnectionPool,
        attempt: AddConnection,
        forget: Callable[[_Retry], None],
    ) -> None:
        super().__init__(pool)
        self._attempt = attempt
        self._forget = forget
        self._due = True

    def now(self, pool: LiveConnectionPool) -> None:
        if self._due:
            self._due = False
            pool.run_task(self._attempt)

    async def tick(self) -> None:
        self._forget(self)
        if self._due:
            self._due = False
            await self._attempt.tick()

    async def _run(self, pool: AsyncConnectionPool[Any]) -> None:
        await self._attempt.run()


class LiveConnectionPool(AsyncConnectionPool[Connection]):
    """An ``AsyncConnectionPool`` whose ``getconn`` (and so ``connection``) never gives out
    a connection the server has closed: such a one is dropped, the pool opens another in
    the background, and the next idle one is tried, within the same timeout. While the
    database refuses connections, a call that finds none idle fails at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refusal: _Refusal | None = None
        """The latest attempt to connect, when it was refused and none has worked since."""
        self._probing = False
        self._retries: set[_Retry] = set()
        """The pool's scheduled attempts at the connections it lost."""

    async def schedule_task(self, task: MaintenanceTask, delay: float) -> None:
        # psycopg_pool schedules a refused connection's next attempt here (it pins 3.3:
        # an AddConnection carrying its backoff).
        if isinstance(task, AddConnection):
            retry = _Retry(self, task, self._retries.discard)
            self._retries.add(retry)
            task = retry
        await super().schedule_task(task, delay)

    def _retry_now(self) -> None:
        """The pool's scheduled attempts made now."""
        retries, self._retries = self._retries, set()
        for retry in retries:
            retry.now(self)

    async def _connect(self, timeout: float | None = None) -> Connection:  # noqa: ASYNC109 - the base class's signature
        # psycopg_pool's one place where connections are made (the pool's own, and the
        # probes below): its outcome says whether the database refuses them.
        try:
            connection = await super()._connect(timeout)
        except Exception as error:
            if _refuses(error):
                self._refusal = _Refusal(time.monotonic(), _first_line(error))
                await self._refuse_waiting(self._refusal)
            raise
        if self._refusal is not None:
            # The database takes connections again: the pool's other attempts, waiting
            # out their backoff, are made now.
            self._refusal = None
            self._retry_now()
        return connection

    async def getconn(self, timeout: float | None = None) -> Connection:  # noqa: ASYNC109 - the base class's signature
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        if self._refusal is not None and not self.get_stats().get("pool_available"):
            await self._unless_refused(wait)
        while True:
            connection = await super().getconn(max(0.0, deadline - time.monotonic()))
            if not closed_by_server(connection):
                return connection
            # Given back closed, so the pool discards it and opens a replacement.
            await connection.close()
            await self.putconn(connection)
            if time.monotonic() >= deadline:
                raise PoolTimeout(f"couldn't get a connection after {wait:.2f} sec")

    async def _refuse_waiting(self, refusal: _Refusal) -> None:
        """Fail the calls waiting for a connection, as the pool fails them when it closes:
        the connection they wait for is the one just refused."""
        async with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        for client in waiting:
            await client.fail(DatabaseRefused(_refused_message(refusal)))

    async def _unless_refused(self, wait: float) -> None:
        """Raise ``DatabaseRefused`` while the latest refusal is fresh, or another call is
        trying the database; otherwise try it (one connection, closed at once), and raise
        if it still refuses."""
        refusal = self._refusal
        if refusal is None:
            return
        if self._probing or time.monotonic() - refusal.at < REFUSAL_FRESH:
            raise DatabaseRefused(_refused_message(refusal))
        self._probing = True
        try:
            probe = await self._connect(timeout=min(wait, self.timeout))
        except Exception:
            raise DatabaseRefused(_refused_message(self._refusal or refusal)) from None
        finally:
            self._probing = False
        # Not kept: the pool counts the connections it makes, and opens its own now.
        await asyncio.shield(probe.close())


def _first_line(error: Exception) -> str:
    return str(error).strip().partition("\n")[0] or type(error).__name__


def _refused_message(refusal: _Refusal) -> str:
    ago = time.monotonic() - refusal.at
    return f"the database refused a connection {ago:.1f} s ago: {refusal.reason}"


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
