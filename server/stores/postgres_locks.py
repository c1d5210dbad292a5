"""The advisory locks a replica holds on the streams it contends for with other replicas
(``domain.ports.SharedStreamLocks``), on connections of their own.

A replica holds a contended stream's lock for a whole turn (``domain.locks.StreamTurns``),
while the commands in the turn load and append. Locks once held a pooled connection each,
from the pool those loads and appends use: a replica contending for as many streams as it
had connections then waited for a connection held by its own turns, and the other replica
waited for those turns' locks, until the pool's timeout answered everybody UNAVAILABLE.
So the locks have a pool of their own, and few connections in it:

- Every lock is first *tried*, without waiting (``og_try_lock_stream_after``), on one
  session, the *holder*, which keeps every lock it takes. A session may hold any number of
  advisory locks, and the holder never runs a statement that waits, so its unlocks are
  never stuck behind a wait.
- Only a lock held by another session is waited for, on a session of its own, which keeps
  it until the turn ends (``og_lock_stream_after``, first in, first out at the database).
  There are at most ``max_waiting`` of these, and a lock is waited for a second at most
  (``LOCK_WAIT_LIMIT``).
- With no session left, or after that second, the turn goes on without the lock. Not
  waiting for a session: a turn holding one may have users waiting for a turn that waits
  for a session, for ever. Not polling the holder for the lock: under load, other
  sessions queue for it at the database, and an unlock hands it to the first of them, so
  a poll may never win. The lock is an optimisation (``domain.locks``): without it, the
  turn's commands decide on what they read, their appends' expected versions keep them
  right, and one that loses a race to another replica is retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq
from psycopg.rows import TupleRow
from psycopg.types.numeric import Int8BinaryDumper, Int8Dumper
from psycopg_pool import AsyncConnectionPool

from domain.ports import RecordedEvent, StreamLocked
from server.stores.postgres_errors import store_error
from server.stores.postgres_schema import STREAM_LOCK_SPACE

log = logging.getLogger("order_gateway.store.postgres")

Connection = psycopg.AsyncConnection[TupleRow]

_TRY_LOCK = f"SELECT pg_try_advisory_lock({STREAM_LOCK_SPACE}, hashtext(%s))"
_TRY_LOCK_AFTER = "SELECT * FROM og_try_lock_stream_after(%s, %s)"
_LOCK = "SELECT og_lock_stream(%s)"
_LOCK_AFTER = "SELECT * FROM og_lock_stream_after(%s, %s)"
_UNLOCK = f"SELECT pg_advisory_unlock({STREAM_LOCK_SPACE}, hashtext(%s))"
_UNLOCK_ALL = "SELECT pg_advisory_unlock_all()"
"""A stream's advisory lock is (namespace, hash of the stream id), a key space apart from
the single-key locks of ``postgres_schema``. Two streams may share a hash: they then take
turns needlessly, never wrongly (the holder takes a lock it holds again, counted)."""

LOCK_WAIT_LIMIT = "1s"
"""The longest a lock is waited for (``lock_timeout`` of the lock sessions). A turn lasts
20 ms plus its commits; a lock kept a second is kept by a replica that is stuck (frozen,
or cut off without its sessions closing yet), and the turn goes on without it rather than
stop the product on every replica."""
SESSION_WAIT = 0.05
"""Seconds a lock waits for a session to wait on, at most, before its turn goes on
without it: sessions come free as turns end, each within 20 ms plus its commits."""
STUCK_MEMORY = 5.0
"""Seconds during which a stream whose lock wait timed out is not waited for again."""
STUCK_PRUNE_AT = 1024
CONTESTED_MEMORY = 0.5
"""Seconds after a lock had to be waited for during which the stream's next lock is
waited for at once."""
CONTESTED_PRUNE_AT = 1024
WITHOUT_LOCK_WARNING_INTERVAL = 60.0
"""Seconds between two warnings that turns went on without the shared lock."""


class PostgresStreamLocks:
    """Stream locks on the connections of ``pool``, which nothing else uses: one holder
    and up to ``max_waiting`` sessions for the locks waited for (the pool's ``max_size``
    must allow ``max_waiting + 1``)."""

    def __init__(self, pool: AsyncConnectionPool[Connection], max_waiting: int) -> None:
        self._pool = pool
        self._max_waiting = max_waiting
        self._waiting = 0
        """Sessions taken for locks waited for, held or being waited on."""
        self._holder: Connection | None = None
        self._holder_taken: asyncio.Task[Connection] | None = None
        self._held: dict[str, _Held] = {}
        """Each stream this process has a turn at, and the session holding its lock."""
        self._session_waiters: deque[asyncio.Future[None]] = deque()
        """Locks waiting for a session to wait on (``_session_free``)."""
        self._contested_until: dict[str, float] = {}
        """Streams another replica held at their last turn here, and until when their
        locks are waited for at once, without a try on the holder first."""
        self._stuck_until: dict[str, float] = {}
        """Streams whose lock a wait timed out on lately, and until when: their turns do
        not wait for it again meanwhile."""
        self._without = 0
        self._warned_at = -WITHOUT_LOCK_WARNING_INTERVAL

    async def lock_stream(self, stream_id: str, after_version: int | None = None) -> StreamLocked:
        now = time.monotonic()
        if (
            self._contested_until.get(stream_id, 0.0) > now
            and self._stuck_until.get(stream_id, 0.0) <= now
            and self._waiting < self._max_waiting
        ):
            # Another replica held it at this stream's last turn, and most likely holds
            # it now (turns alternate): the try on the holder would only cost a round
            # trip before the wait, which tries first anyway.
            return await self._wait_for(stream_id, after_version)
        try:
            locked = await self._try_on_holder(stream_id, after_version)
        except psycopg.OperationalError as error:
            # The holder was lost (killed, or the database went away): the commands can
            # still go on, and if the database is gone their loads say so.
            return self._go_on_without(stream_id, f"its session was lost ({error})")
        if locked is not None:
            return locked
        self._contested(stream_id)
        if self._stuck_until.get(stream_id, 0.0) > time.monotonic():
            return self._go_on_without(stream_id, "its holder kept it too long lately")
        if not await self._session_free():
            return self._go_on_without(stream_id, "all sessions for waiting are in use")
        return await self._wait_for(stream_id, after_version)

    async def _session_free(self) -> bool:
        """Whether a session for waiting is free, waiting ``SESSION_WAIT`` for one at
        most. Sessions come free as turns end, every few milliseconds under load; the
        wait is bounded because a turn that holds one may have users that wait for this
        turn."""
        try:
            async with asyncio.timeout(SESSION_WAIT):
                while self._waiting >= self._max_waiting:
                    freed = asyncio.get_running_loop().create_future()
                    self._session_waiters.append(freed)
                    try:
                        await freed
                    finally:
                        if freed in self._session_waiters:
                            self._session_waiters.remove(freed)
        except TimeoutError:
            return False
        return True

    def _session_given_back(self) -> None:
        self._waiting -= 1
        while self._session_waiters:
            freed = self._session_waiters.popleft()
            if not freed.done():
                freed.set_result(None)
                return

    async def _try_on_holder(
        self, stream_id: str, after_version: int | None
    ) -> StreamLocked | None:
        holder = await self._take_holder()
        tried = asyncio.ensure_future(_try_lock(holder, stream_id, after_version))
        try:
            # Shielded: cancelled half-way, the holder's other locks must stay, so the try
            # runs to its end and a lock it took is let go again.
            locked = await asyncio.shield(tried)
        except asyncio.CancelledError:
            tried.add_done_callback(lambda done: self._let_go_if_taken(holder, stream_id, done))
            raise
        except psycopg.OperationalError:
            await self._drop_holder_if_broken(holder)
            raise
        except psycopg.Error as error:
            raise store_error(error, "lock_stream") from error
        if locked is not None:
            self._held[stream_id] = _Held(holder, own_session=False)
        return locked

    async def _wait_for(self, stream_id: str, after_version: int | None) -> StreamLocked:
        self._waiting += 1
        try:
            try:
                session = await self._pool.getconn()
            except psycopg.Error as error:
                raise store_error(error, "lock_stream") from error
            try:
                locked = await _lock(session, stream_id, after_version)
            except psycopg.errors.LockNotAvailable:
                # Waited LOCK_WAIT_LIMIT: the holder is stuck (a replica frozen, say).
                # Later turns go on without waiting, for a while, instead of a second each.
                await self._pool.putconn(session)
                self._session_given_back()
                self._stuck_until[stream_id] = time.monotonic() + STUCK_MEMORY
                if len(self._stuck_until) > STUCK_PRUNE_AT:
                    now = time.monotonic()
                    self._stuck_until = {s: t for s, t in self._stuck_until.items() if t > now}
                return self._go_on_without(stream_id, "its holder kept it too long")
            except BaseException as error:
                # Cancelled or failed mid-way, the lock may be held or not.
                await self._give_back(session)
                if isinstance(error, psycopg.OperationalError):
                    self._session_given_back()
                    return self._go_on_without(stream_id, f"its session was lost ({error})")
                if isinstance(error, psycopg.Error):
                    raise store_error(error, "lock_stream") from error
                raise
        except BaseException:
            self._session_given_back()
            raise
        if locked.waited:
            self._contested(stream_id)
        self._held[stream_id] = _Held(session, own_session=True)
        return locked

    async def unlock_stream(self, stream_id: str) -> None:
        held = self._held.pop(stream_id, None)
        if held is None:
            # Let go already (the store closing while the turn ended), or never taken.
            return
        session = held.session
        if held.own_session:
            # Its own session: whatever happens to the unlock, the session goes back to
            # the pool without the lock.
            try:
                await self._give_back(session)
            finally:
                self._session_given_back()
            return
        try:
            # A closed session took its locks with it (a holder lost and replaced).
            if not session.closed:
                await session.execute(_UNLOCK, (stream_id,), prepare=True)
        except BaseException as error:
            await self._drop_holder_if_broken(session)
            if isinstance(error, psycopg.Error) and not session.closed:
                raise store_error(error, "unlock_stream") from error
            if not isinstance(error, psycopg.Error):
                raise
            # The session is gone, and its lock with it: nothing failed.
            log.debug("the session holding the lock of %s was lost", stream_id)

    async def _give_back(self, session: Connection) -> None:
        """A waiting session back to the pool, without any lock, whatever state a
        cancelled or failed statement left it in.

        psycopg cancels an interrupted statement at the server and waits for its end, so a
        session whose wait was cancelled is usually idle, and may or may not have got the
        lock: letting go of every lock it holds (it holds no other) keeps it for the next
        wait. Closing it instead cost a new connection each time, and psycopg_pool logged
        each as a WARNING "discarding closed connection", which reads as the database's
        fault (under contention with clients that cancel, dozens a minute). A session in
        any other state is closed, which lets go of its locks too.
        """
        kept = False
        try:
            kept = await _without_locks(session)
        finally:
            if not kept:
                await session.close()
            await self._pool.putconn(session)

    async def close(self) -> None:
        """Let go of every lock held, then of the connections."""
        for stream_id in list(self._held):
            try:
                await self.unlock_stream(stream_id)
            except Exception:
                log.debug("releasing the lock of %s on close failed", stream_id, exc_info=True)
        if self._holder_taken is not None:
            self._holder_taken.cancel()
            await asyncio.wait([self._holder_taken])
        if self._holder is not None:
            await self._pool.putconn(self._holder)
            self._holder = None
        await self._pool.close()

    async def _take_holder(self) -> Connection:
        if self._holder is not None and not self._holder.broken:
            return self._holder
        if self._holder is not None:
            await self._drop_holder_if_broken(self._holder)
        if self._holder_taken is None:
            self._holder_taken = asyncio.ensure_future(self._pool.getconn())
        taking = self._holder_taken
        try:
            # Shielded: the first lock after (re)connecting takes it for everybody.
            holder = await asyncio.shield(taking)
        except psycopg.Error as error:
            raise store_error(error, "lock_stream") from error
        finally:
            if taking.done() and self._holder_taken is taking:
                self._holder_taken = None
        if self._holder is None:
            self._holder = holder
        return self._holder

    async def _drop_holder_if_broken(self, holder: Connection) -> None:
        """A broken holder took its locks with it: give it back (the pool discards it)
        and take another for the next lock. Turns that held a lock on it end without one
        to release."""
        if holder is self._holder and (holder.broken or holder.closed):
            self._holder = None
            await self._pool.putconn(holder)

    def _let_go_if_taken(
        self, holder: Connection, stream_id: str, tried: asyncio.Future[StreamLocked | None]
    ) -> None:
        if tried.cancelled() or tried.exception() is not None or tried.result() is None:
            return
        if holder.closed:
            return
        task = asyncio.ensure_future(holder.execute(_UNLOCK, (stream_id,), prepare=True))
        task.add_done_callback(_logged_failure)

    def _contested(self, stream_id: str) -> None:
        now = time.monotonic()
        if len(self._contested_until) > CONTESTED_PRUNE_AT:
            self._contested_until = {s: t for s, t in self._contested_until.items() if t > now}
        self._contested_until[stream_id] = now + CONTESTED_MEMORY

    def _go_on_without(self, stream_id: str, why: str) -> StreamLocked:
        """The turn at ``stream_id`` goes on without the lock: its commands decide on the
        state they read and their appends' expected versions keep them right, as on a
        stream nobody contends for (a command that loses a race is retried)."""
        self._without += 1
        now = time.monotonic()
        if now - self._warned_at >= WITHOUT_LOCK_WARNING_INTERVAL:
            self._warned_at = now
            log.warning(
                "a turn at %s goes on without the shared lock: %s (%d such turns so far)",
                stream_id,
                why,
                self._without,
            )
        return StreamLocked(True)


@dataclass(frozen=True, slots=True)
class _Held:
    """Where a stream's lock is held."""

    session: Connection
    own_session: bool
    """A session of its own (the lock was waited for), given back with the lock; else the
    holder."""


async def _try_lock(
    session: Connection, stream_id: str, after_version: int | None
) -> StreamLocked | None:
    """The lock if no other session holds it (None if one does), and the events after
    ``after_version`` if given."""
    cursor = session.cursor(binary=True)
    if after_version is None:
        await cursor.execute(_TRY_LOCK, (stream_id,), prepare=True)
        row = await cursor.fetchone()
        return StreamLocked(False) if row and row[0] else None
    await cursor.execute(_TRY_LOCK_AFTER, (stream_id, after_version), prepare=True)
    rows = await cursor.fetchall()
    if not rows[0][0]:
        return None
    return StreamLocked(False, _events(rows))


async def _lock(session: Connection, stream_id: str, after_version: int | None) -> StreamLocked:
    """The lock, waited for behind whoever holds it (FIFO at the database)."""
    cursor = session.cursor(binary=True)
    if after_version is None:
        await cursor.execute(_LOCK, (stream_id,), prepare=True)
        row = await cursor.fetchone()
        return StreamLocked(bool(row and row[0]))
    await cursor.execute(_LOCK_AFTER, (stream_id, after_version), prepare=True)
    rows = await cursor.fetchall()
    return StreamLocked(bool(rows[0][0]), _events(rows))


async def _without_locks(session: Connection) -> bool:
    """Whether ``session`` is open and idle, and has let go of every advisory lock."""
    if session.closed or session.info.transaction_status != pq.TransactionStatus.IDLE:
        return False
    try:
        await session.execute(_UNLOCK_ALL, prepare=True)
    except psycopg.Error:
        return False
    return True


async def configure(session: Connection) -> None:
    """Each lock session, when the pool opens it: the events it reads back load as the
    pooled reads' do (UTC timestamps), and ints go as bigint, one prepared plan each."""
    session.adapters.register_dumper(int, Int8Dumper)
    session.adapters.register_dumper(int, Int8BinaryDumper)
    await session.execute(f"SET TimeZone TO 'UTC'; SET lock_timeout TO '{LOCK_WAIT_LIMIT}'")
    try:
        # PostgreSQL 14 and later: a backend waiting for a lock notices within a second
        # that its session was closed (a cancelled wait), instead of keeping its place
        # in the lock's queue, and a connection slot, until the lock comes.
        await session.execute("SET client_connection_check_interval TO '1s'")
    except psycopg.errors.UndefinedObject:
        log.debug("client_connection_check_interval is not known to this server")


def _events(rows: Sequence[TupleRow]) -> list[RecordedEvent]:
    return [RecordedEvent(*row[1:]) for row in rows if row[1] is not None]


def _logged_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("releasing a stream lock after a cancelled turn failed: %s", task.exception())
