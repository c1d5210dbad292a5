"""The advisory locks a PostgreSQL replica holds on contended streams
(``server.stores.postgres_locks``): apart from the pool that loads and appends, on few
sessions, waited for first in first out, and never waited for by a connection."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest

from domain.ports import StreamLocked
from server.stores.postgres import PostgresEventStore
from server.stores.postgres_schema import STREAM_LOCK_SPACE
from tests.stores.test_postgres_specific import TIMEOUT, commit

pytestmark = pytest.mark.postgres

SMALLEST_POOL = 3
"""``store_pool_size``'s least value."""
WAITING_SESSIONS = 1
"""Sessions for locks waited for, with the smallest pool: half of it."""


@pytest.fixture
async def small(fresh_postgres_url: str) -> AsyncIterator[PostgresEventStore]:
    opened = await PostgresEventStore.open(fresh_postgres_url, max_connections=SMALLEST_POOL)
    yield opened
    await opened.close()


@pytest.fixture
async def other(fresh_postgres_url: str) -> AsyncIterator[PostgresEventStore]:
    opened = await PostgresEventStore.open(fresh_postgres_url)
    yield opened
    await opened.close()


def stream_locks(url: str) -> list[tuple[int, bool]]:
    """Each stream lock in the database, by the session that holds or waits for it: its
    process id and whether it is granted."""
    with psycopg.connect(url, autocommit=True) as conn:
        return [
            (pid, granted)
            for pid, granted in conn.execute(
                "SELECT pid, granted FROM pg_locks WHERE locktype = 'advisory'"
                " AND classid = %s::bigint::oid AND database ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())",
                (STREAM_LOCK_SPACE,),
            )
        ]


async def until(condition_met: Callable[[], bool], seconds: float = TIMEOUT) -> None:
    """Wait until ``condition_met()`` is true."""
    for _ in range(int(seconds / 0.01)):
        if condition_met():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


async def test_locks_taken_at_once_share_one_session_and_leave_the_pool_to_loads_and_appends(
    small: PostgresEventStore, fresh_postgres_url: str
) -> None:
    streams = [f"hot-{n}" for n in range(4 * SMALLEST_POOL)]
    for stream_id in streams:
        assert (await small.lock_stream(stream_id, 0)).waited is False

    held = stream_locks(fresh_postgres_url)
    assert len(held) == len(streams) and all(granted for _, granted in held)
    assert len({pid for pid, _ in held}) == 1, "one session holds them all"
    # The pool of three still serves appends and reads at once, as if no lock were held.
    appended = await asyncio.wait_for(
        asyncio.gather(*(small.append(commit((s, 1))) for s in streams)), TIMEOUT
    )
    assert await small.read_stream(streams[0]) == appended[0]

    for stream_id in streams:
        await small.unlock_stream(stream_id)
    assert stream_locks(fresh_postgres_url) == []


async def test_locks_held_elsewhere_are_waited_for_on_few_sessions_and_beyond_go_without(
    small: PostgresEventStore, other: PostgresEventStore, fresh_postgres_url: str
) -> None:
    """More locks to wait for than sessions to wait on: those beyond go on at once without
    the lock (never waiting for a session, which a turn could wait for for ever); those
    waited for are taken once their holder lets go, with what the holder appended."""
    streams = [f"hot-{n}" for n in range(2 * SMALLEST_POOL)]
    for stream_id in streams:
        await other.lock_stream(stream_id)
    waited_for = streams[:WAITING_SESSIONS]
    waiting = [asyncio.create_task(small.lock_stream(s, 0)) for s in waited_for]
    await until(lambda: sum(not g for _, g in stream_locks(fresh_postgres_url)) == WAITING_SESSIONS)
    without = [await small.lock_stream(s, 0) for s in streams[WAITING_SESSIONS:]]
    assert [(one.waited, one.events_after) for one in without] == [(True, None)] * len(without)
    assert sum(not g for _, g in stream_locks(fresh_postgres_url)) == WAITING_SESSIONS
    await asyncio.sleep(0.1)
    assert not any(task.done() for task in waiting)
    appended = [await other.append(commit((s, 1))) for s in waited_for]

    for stream_id in streams:
        await other.unlock_stream(stream_id)
    locked = await asyncio.wait_for(asyncio.gather(*waiting), TIMEOUT)

    assert [one.waited for one in locked] == [True] * len(waited_for)
    assert [one.events_after for one in locked] == appended
    assert len(stream_locks(fresh_postgres_url)) == len(waited_for)
    for stream_id in streams:
        await small.unlock_stream(stream_id)
    assert stream_locks(fresh_postgres_url) == []


async def test_a_lock_kept_too_long_is_not_waited_for_beyond_the_limit(
    small: PostgresEventStore, other: PostgresEventStore, fresh_postgres_url: str
) -> None:
    """A replica that keeps a product's lock (frozen, say) stops the product on the other
    replicas for a second at most: their turns then go on without it."""
    await other.lock_stream("stuck")
    started = time.monotonic()
    locked = await asyncio.wait_for(small.lock_stream("stuck", 0), TIMEOUT)
    waited = time.monotonic() - started

    assert (locked.waited, locked.events_after) == (True, None)
    assert 0.9 <= waited < TIMEOUT
    assert [granted for _, granted in stream_locks(fresh_postgres_url)] == [True]
    await small.unlock_stream("stuck")
    # The next turns do not wait a second each while the holder stays stuck.
    started = time.monotonic()
    assert await small.lock_stream("stuck", 0) == StreamLocked(True)
    assert time.monotonic() - started < 0.5
    await small.unlock_stream("stuck")
    # The session waited on is free again for the next wait.
    await other.unlock_stream("stuck")
    assert (await small.lock_stream("stuck", 0)).waited is False
    await small.unlock_stream("stuck")


async def test_a_cancelled_wait_leaves_no_lock_and_the_others_held(
    small: PostgresEventStore, other: PostgresEventStore, fresh_postgres_url: str
) -> None:
    await small.lock_stream("mine")
    await other.lock_stream("theirs")
    waiting = asyncio.create_task(small.lock_stream("theirs"))
    await until(lambda: any(not granted for _, granted in stream_locks(fresh_postgres_url)))

    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await other.unlock_stream("theirs")

    # Nobody took "theirs" behind the cancelled wait; "mine" is still held.
    assert len(stream_locks(fresh_postgres_url)) == 1
    assert (await other.lock_stream("theirs")).waited is False
    blocked = asyncio.create_task(other.lock_stream("mine"))
    await asyncio.sleep(0.1)
    assert not blocked.done()
    await small.unlock_stream("mine")
    assert (await asyncio.wait_for(blocked, TIMEOUT)).waited is True
    await other.unlock_stream("mine")
    await other.unlock_stream("theirs")


async def test_a_cancelled_wait_keeps_its_session_for_the_next_wait(
    small: PostgresEventStore,
    other: PostgresEventStore,
    fresh_postgres_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Clients that cancel while their turn waits for another replica's lock are common
    under contention: each cancelled wait cost a new connection, and a WARNING from
    psycopg_pool that reads as a database fault."""
    await other.lock_stream("theirs")
    waiting = asyncio.create_task(small.lock_stream("theirs"))
    await until(lambda: any(not granted for _, granted in stream_locks(fresh_postgres_url)))
    (session,) = [pid for pid, granted in stream_locks(fresh_postgres_url) if not granted]
    with caplog.at_level(logging.WARNING, logger="psycopg"):
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

        again = asyncio.create_task(small.lock_stream("theirs"))
        await until(lambda: any(not granted for _, granted in stream_locks(fresh_postgres_url)))
        assert [pid for pid, granted in stream_locks(fresh_postgres_url) if not granted] == [
            session
        ]
        await other.unlock_stream("theirs")
        assert (await asyncio.wait_for(again, TIMEOUT)).waited is True
        await small.unlock_stream("theirs")
    assert stream_locks(fresh_postgres_url) == []
    assert not [r for r in caplog.records if r.name.startswith("psycopg")], caplog.text


async def test_a_lost_holder_fails_no_call_and_the_next_lock_takes_a_new_session(
    small: PostgresEventStore, other: PostgresEventStore, fresh_postgres_url: str
) -> None:
    """The lock is an optimisation: the turn that finds its session killed goes on
    without it (its commands then reach the database, or say it is gone)."""
    await small.lock_stream("before")
    [(pid, _)] = stream_locks(fresh_postgres_url)
    with psycopg.connect(fresh_postgres_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    assert await small.lock_stream("lost") == StreamLocked(True)
    await small.unlock_stream("lost")
    assert (await small.lock_stream("after")).waited is False
    # The lost session took its lock with it; its turn ends without an error, and
    # without counting as a session given back.
    await small.unlock_stream("before")
    await small.unlock_stream("after")
    assert stream_locks(fresh_postgres_url) == []

    streams = [f"theirs-{n}" for n in range(3)]
    for stream_id in streams:
        await other.lock_stream(stream_id)
    waiting = [asyncio.create_task(small.lock_stream(s)) for s in streams]
    await asyncio.sleep(0.3)
    assert sum(not granted for _, granted in stream_locks(fresh_postgres_url)) == WAITING_SESSIONS
    for stream_id in streams:
        await other.unlock_stream(stream_id)
    await asyncio.wait_for(asyncio.gather(*waiting), TIMEOUT)
    for stream_id in streams:
        await small.unlock_stream(stream_id)


async def test_a_lock_waited_for_last_turn_is_asked_for_on_a_waiting_session_next_turn(
    small: PostgresEventStore, other: PostgresEventStore, fresh_postgres_url: str
) -> None:
    """Two replicas alternating on a product: the lock another replica held at the last
    turn is asked for straight away on a session that may wait (one round trip, which
    tries first anyway), not tried on the holder first."""
    await small.lock_stream("mine")
    [(holder, _)] = stream_locks(fresh_postgres_url)
    await other.lock_stream("hot")
    waiting = asyncio.create_task(small.lock_stream("hot"))
    await until(lambda: any(not granted for _, granted in stream_locks(fresh_postgres_url)))
    await other.unlock_stream("hot")
    assert (await asyncio.wait_for(waiting, TIMEOUT)).waited
    await small.unlock_stream("hot")

    assert (await small.lock_stream("hot")).waited is False
    sessions = {pid for pid, _ in stream_locks(fresh_postgres_url)}
    assert len(sessions) == 2 and holder in sessions, "not on the holder"
    await small.unlock_stream("hot")
    await small.unlock_stream("mine")
