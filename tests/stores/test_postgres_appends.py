"""How the PostgreSQL store sends appends: batches in flight at once, the order commits that
build on each other are applied in, and appends that stay lookups as the store grows.

The behaviour every store shares is in ``tests/conformance``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psycopg
import pytest

from domain.errors import DuplicateCommandError
from server.stores.postgres import PostgresEventStore
from server.stores.postgres_schema import APPEND_LOCK
from tests.stores.test_postgres_specific import commit

pytestmark = pytest.mark.postgres

TIMEOUT = 60.0
"""Bound on every wait, so that a hang fails instead of blocking the suite."""


@pytest.fixture
async def store(fresh_postgres_url: str) -> AsyncIterator[PostgresEventStore]:
    opened = await PostgresEventStore.open(fresh_postgres_url)
    yield opened
    await opened.close()


async def waiting_at_the_append_lock(conn: psycopg.AsyncConnection, count: int) -> None:
    """Return once ``count`` sessions of this database wait for the append lock."""
    for _ in range(int(TIMEOUT / 0.01)):
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
        )
        row = await cursor.fetchone()
        if row is not None and row[0] >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} batches never waited at the append lock together")


async def test_the_next_batch_is_sent_while_one_is_in_flight(
    store: PostgresEventStore, fresh_postgres_url: str
) -> None:
    """So that PostgreSQL goes from one batch's commit straight to the next."""
    async with await psycopg.AsyncConnection.connect(fresh_postgres_url, autocommit=True) as other:
        await other.execute("SELECT pg_advisory_lock(%s)", (APPEND_LOCK,))
        first = [asyncio.ensure_future(store.append(commit((f"a-{n}", 1)))) for n in range(3)]
        await waiting_at_the_append_lock(other, 1)
        second = [asyncio.ensure_future(store.append(commit((f"b-{n}", 1)))) for n in range(3)]
        await waiting_at_the_append_lock(other, 2)
        await other.execute("SELECT pg_advisory_unlock(%s)", (APPEND_LOCK,))

    results = await asyncio.wait_for(asyncio.gather(*first, *second), TIMEOUT)

    assert sorted(e.position for result in results for e in result) == list(range(1, 7))
    assert await store.read_all() == sorted(
        (e for result in results for e in result), key=lambda e: e.position
    )


async def test_commits_made_together_apply_in_the_order_they_were_made(
    store: PostgresEventStore,
) -> None:
    """A commit naming a stream or command id of a batch in flight waits for its outcome,
    as it would if that batch had already committed, rather than racing it."""
    chain = [commit(("chain", version)) for version in range(1, 11)]
    repeated = [commit((f"once-{n}", 1), command_id="same-command") for n in range(3)]
    attempts = [chain[0], repeated[0], chain[1], repeated[1], chain[2], repeated[2], *chain[3:]]

    results = await asyncio.wait_for(
        asyncio.gather(*(store.append(c) for c in attempts), return_exceptions=True), TIMEOUT
    )
    outcome = dict(zip((id(c) for c in attempts), results, strict=True))

    assert [type(outcome[id(c)]) for c in chain] == [list] * 10
    assert [type(outcome[id(c)]) for c in repeated] == [
        list,
        DuplicateCommandError,
        DuplicateCommandError,
    ]
    assert [e.stream_version for e in await store.read_stream("chain")] == list(range(1, 11))


async def test_an_append_after_the_connection_kept_for_appends_was_killed_works(
    store: PostgresEventStore, fresh_postgres_url: str, postgres_url: str
) -> None:
    """A connection is kept for appends from one batch to the next: once the server has
    closed it, the next append takes a working connection instead of failing on it."""
    await store.append(commit(("a", 1)))
    database = fresh_postgres_url.rpartition("/")[2]
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid, %s) FROM pg_stat_activity WHERE datname = %s",
            (int(TIMEOUT * 1000), database),
        )

    await store.append(commit(("a", 2)))
    assert [e.stream_version for e in await store.read_stream("a")] == [1, 2]


@pytest.mark.parametrize("analyzed_while_empty", [False, True], ids=["fresh", "analyzed"])
async def test_appends_read_only_the_rows_they_check_as_the_store_grows(
    fresh_postgres_url: str, analyzed_while_empty: bool
) -> None:
    """Each connection caches og_append's query plans, made with the table sizes of the
    moment: on a new database a plan that scans whole tables looks cheapest, and then makes
    every append slower as the store grows (until an ANALYZE happens to replace it).

    PostgreSQL counts the rows every scan returns; lookups return about one per check.
    """
    commits, per_call = 1500, 15
    if analyzed_while_empty:
        await (await PostgresEventStore.open(fresh_postgres_url)).close()
        with psycopg.connect(fresh_postgres_url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE events")
            conn.execute("VACUUM ANALYZE commands")
    store = await PostgresEventStore.open(fresh_postgres_url)
    try:
        for start in range(0, commits, per_call):
            await asyncio.wait_for(
                asyncio.gather(
                    *(
                        store.append(commit((f"order-{n}", 1), (f"product-{n % 10}", n // 10 + 1)))
                        for n in range(start, start + per_call)
                    )
                ),
                TIMEOUT,
            )
    finally:
        # The store's sessions end, and report their counts as they do.
        await store.close()

    with psycopg.connect(fresh_postgres_url, autocommit=True) as conn:
        for _ in range(int(TIMEOUT / 0.05)):
            rows = conn.execute(
                "SELECT s.relname, s.n_tup_ins,"
                " coalesce(s.seq_tup_read, 0) + coalesce(sum(i.idx_tup_read), 0)"
                " FROM pg_stat_user_tables s"
                " LEFT JOIN pg_stat_user_indexes i USING (relid)"
                " WHERE s.relname IN ('events', 'commands')"
                " GROUP BY s.relname, s.n_tup_ins, s.seq_tup_read"
            ).fetchall()
            inserted = {table: int(count) for table, count, _ in rows}
            # Each connection's rehearsal, rolled back, counts as an insert too.
            if inserted.get("events", 0) >= 2 * commits:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the statistics never showed every insert: {rows}")

    # Per commit: a lookup per stream it expects, one for its command id, one for the
    # head per batch; a scan of a whole table would read thousands of rows per batch.
    read = sum(int(rows_read) for _, _, rows_read in rows)
    assert read < 10 * commits, rows


async def test_an_append_made_as_the_last_writer_stops_is_written(
    fresh_postgres_url: str,
) -> None:
    """A caller answered by a writer that then finds nothing left to send appends again at
    once, before that writer's task has ended: a writer must still take the append.
    With one writer at most, every such append comes while the only writer is ending."""
    store = await PostgresEventStore.open(fresh_postgres_url, max_in_flight=1)
    try:
        async with asyncio.timeout(TIMEOUT):
            for version in range(1, 4):
                await store.append(commit(("one-after-another", version)))
    finally:
        await store.close()


async def test_an_append_made_as_both_writers_stop_is_written(
    store: PostgresEventStore, fresh_postgres_url: str
) -> None:
    """Two batches answered in one turn of the event loop: the caller of the first appends
    again at once, while both writers are ending (one caller answered after the other)."""
    async with await psycopg.AsyncConnection.connect(fresh_postgres_url, autocommit=True) as other:
        for round_ in range(20):

            async def then_again(stream: str) -> None:
                await store.append(commit((stream, 1)))
                await store.append(commit((stream, 2)))

            await other.execute("SELECT pg_advisory_lock(%s)", (APPEND_LOCK,))
            first = asyncio.ensure_future(then_again(f"first-{round_}"))
            await waiting_at_the_append_lock(other, 1)
            second = asyncio.ensure_future(store.append(commit((f"second-{round_}", 1))))
            await waiting_at_the_append_lock(other, 2)
            await other.execute("SELECT pg_advisory_unlock(%s)", (APPEND_LOCK,))
            async with asyncio.timeout(TIMEOUT):
                await asyncio.gather(first, second)
