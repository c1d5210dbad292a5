"""What only the PostgreSQL store has to prove: migrations under concurrency, positions seen
in order by a tailing reader while several processes write, LISTEN/NOTIFY between replicas,
driver errors translated, and two gateways on one database never overselling.

The behaviour every store shares is in ``tests/conformance``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import resource
import select
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from orders.v1 import (
    event_stream_service_pb2_grpc,
    events_pb2,
    inventory_command_service_pb2_grpc,
    order_command_service_pb2_grpc,
)
from psycopg.conninfo import make_conninfo

from domain.commands import RestockProduct
from domain.errors import (
    ConcurrencyConflictError,
    DuplicateCommandError,
    StoreError,
    StoreUnavailableError,
)
from domain.ports import Commit, NewEvent, RecordedEvent, Snapshot
from domain.snapshots import Snapshots
from server.app import create_server
from server.bootstrap import bootstrap
from server.config import Settings
from server.stores.postgres import (
    LISTENER_APPLICATION_NAME,
    PostgresEventStore,
    _connect_kwargs,
)
from server.stores.postgres_pool import closed_by_server
from server.stores.postgres_schema import (
    APPEND_LOCK,
    CONSUMER_GROUP_TABLES,
    MIGRATIONS,
    apply_migrations,
)
from server.stores.urls import StoreURLError
from server.verify import verify
from tests.clients import Clients, detail, item, order_request
from tests.conformance.contract import commit_of
from tests.postgres_databases import new_database, new_role

pytestmark = pytest.mark.postgres

TIMEOUT = 120.0
"""Bound on every multi-party wait, so that a hang fails instead of blocking the suite."""


def commit(
    *events: tuple[str, int], command_id: str | None = None, user_id: str = "user-1"
) -> Commit:
    """One event per ``(stream, version)``, each stream expected just before its event."""
    return Commit(
        command_id=command_id or str(uuid.uuid4()),
        fingerprint="fingerprint",
        correlation_id="correlation",
        user_id=user_id,
        occurred_at=dt.datetime.now(dt.UTC),
        expected_versions={stream: version - 1 for stream, version in events},
        events=[NewEvent(str(uuid.uuid4()), s, v, "TestEvent", b"{}") for s, v in events],
    )


@pytest.fixture
async def store(fresh_postgres_url: str) -> AsyncIterator[PostgresEventStore]:
    opened = await PostgresEventStore.open(fresh_postgres_url)
    yield opened
    await opened.close()


def terminate_connections(admin_url: str, database_url: str) -> None:
    """Drop every connection to ``database_url``'s database, as a server restart would."""
    database = database_url.rpartition("/")[2]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (database,),
        )


async def until_terminated(admin_url: str, database_url: str) -> None:
    """Wait until no connection to ``database_url``'s database is left but the admin's."""
    database = database_url.rpartition("/")[2]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        for _ in range(int(TIMEOUT / 0.05)):
            (left,) = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> %s",
                (database, admin.info.backend_pid),
            ).fetchone() or (0,)
            if not left:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("connections still open")


async def until_reconnected(works: Callable[[], Awaitable[None]]) -> None:
    """Retry ``works`` while the store is unavailable, for up to ``TIMEOUT``."""
    for _ in range(int(TIMEOUT / 0.05)):
        try:
            await works()
            return
        except StoreUnavailableError:
            await asyncio.sleep(0.05)
    raise AssertionError("the store never reconnected")


# -- migrations ---------------------------------------------------------------------


def applied_versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]


async def test_migrations_run_once_and_reopening_changes_nothing(fresh_postgres_url: str) -> None:
    first = await PostgresEventStore.open(fresh_postgres_url)
    await first.append(commit(("a", 1)))
    await first.close()

    async with await psycopg.AsyncConnection.connect(fresh_postgres_url, autocommit=True) as conn:
        assert await apply_migrations(conn) == []
    again = await PostgresEventStore.open(fresh_postgres_url)
    try:
        assert [e.stream_id for e in await again.read_all()] == ["a"]
    finally:
        await again.close()
    assert applied_versions(fresh_postgres_url) == [m.version for m in MIGRATIONS]


async def test_events_stored_before_schema_versions_read_as_version_1(
    fresh_postgres_url: str,
) -> None:
    """A database of the release before schema versions: its rows, and the appends of its
    replicas still running during a rolling upgrade (og_append without the versions),
    read as version 1; appends of this release keep their versions."""
    async with await psycopg.AsyncConnection.connect(fresh_postgres_url, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
            " description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in MIGRATIONS[:2]:
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (%s, 'old')",
                (migration.version,),
            )
        old_append = (
            "SELECT og_append(ARRAY[%s], ARRAY['f'], ARRAY['c'], ARRAY['u'], ARRAY[now()],"
            " ARRAY[1], ARRAY[1], ARRAY[%s], ARRAY[%s]::bigint[], ARRAY[1], ARRAY[%s],"
            " ARRAY[%s], ARRAY[%s]::bigint[], ARRAY['TestEvent'], ARRAY['{}'::bytea])"
        )
        await conn.execute(old_append, ("cmd-1", "old", 0, "e-1", "old", 1))
        store = await PostgresEventStore.open(fresh_postgres_url)
        try:
            # An old replica's append, after the new release migrated.
            await conn.execute(old_append, ("cmd-2", "old", 1, "e-2", "old", 2))
            new = commit(("new", 1))
            new = dataclasses.replace(
                new, events=[dataclasses.replace(new.events[0], schema_version=2)]
            )
            await store.append(new)
            events = await store.read_all()
        finally:
            await store.close()
    assert [(e.stream_id, e.schema_version) for e in events] == [
        ("old", 1),
        ("old", 1),
        ("new", 2),
    ]


async def test_concurrent_migrations_apply_each_version_exactly_once(
    fresh_postgres_url: str,
) -> None:
    async def migrate() -> list[int]:
        conn = await psycopg.AsyncConnection.connect(fresh_postgres_url, autocommit=True)
        async with conn:
            return await apply_migrations(conn)

    results = await asyncio.wait_for(asyncio.gather(*(migrate() for _ in range(6))), TIMEOUT)

    everything = [m.version for m in MIGRATIONS]
    assert sorted(results) == [[]] * 5 + [everything]
    assert applied_versions(fresh_postgres_url) == everything


def test_two_migrate_commands_at_once_both_succeed(fresh_postgres_url: str) -> None:
    command = [sys.executable, "-m", "server.cli", "migrate", "--store", fresh_postgres_url]
    children = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [child.communicate(timeout=TIMEOUT)[0] for child in children]

    assert [child.returncode for child in children] == [0, 0], outputs
    assert applied_versions(fresh_postgres_url) == [m.version for m in MIGRATIONS]


async def test_a_database_migrated_by_the_first_text_of_migration_3_gets_og_lock_stream(
    fresh_postgres_url: str,
) -> None:
    """Migration 3 as first released made og_append_chain alone; og_lock_stream came into
    its text later, so a database migrated by the first text never had it, and a turn at
    a stream a replica had not cached failed (INTERNAL) there."""
    first_text_of_3 = MIGRATIONS[2].sql[
        : MIGRATIONS[2].sql.index("-- Takes a replica's session lock")
    ]
    async with await psycopg.AsyncConnection.connect(fresh_postgres_url, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
            " description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, sql in ((1, MIGRATIONS[0].sql), (2, MIGRATIONS[1].sql), (3, first_text_of_3)):
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (%s, 'old')",
                (version,),
            )
        assert await apply_migrations(conn) == [m.version for m in MIGRATIONS[3:]]
        cursor = await conn.execute("SELECT og_lock_stream('product-x')")
        assert await cursor.fetchone() == (False,)


@pytest.mark.parametrize("migrate", [True, False])
async def test_a_database_that_lost_a_table_or_a_function_is_refused_when_opened(
    fresh_postgres_url: str, migrate: bool
) -> None:
    """Its migrations all recorded, nothing would make them again: served, every command
    needing them would fail."""
    await (await PostgresEventStore.open(fresh_postgres_url)).close()
    with psycopg.connect(fresh_postgres_url, autocommit=True) as conn:
        conn.execute("DROP TABLE commands")
        conn.execute("DROP FUNCTION og_append_chain")
    with pytest.raises(StoreError) as raised:
        await (await PostgresEventStore.open(fresh_postgres_url, migrate=migrate)).close()
    assert str(raised.value) == (
        "the database's schema is incomplete: it lacks table commands, function"
        " og_append_chain(), though schema_migrations records every migration that makes them"
    )


SERVING_GRANTS = (
    "SELECT ON schema_migrations",
    "SELECT, INSERT ON events, commands",
    f"SELECT, INSERT, UPDATE, DELETE ON {', '.join(CONSUMER_GROUP_TABLES)}",
)
"""docs/operations.md, Privileges, but for the snapshots'."""


def limited_role(url: str, *extra_grants: str) -> contextlib.AbstractContextManager[str]:
    """The URL of a new login role with the grants docs/operations.md lists but the
    snapshots' (and ``extra_grants``, e.g. "SELECT ON snapshots"); dropped after."""
    return new_role(url, *SERVING_GRANTS, *extra_grants)


async def test_a_role_that_cannot_change_the_schema_serves_a_migrated_database(
    fresh_postgres_url: str,
) -> None:
    """What docs/operations.md promises: migrate as the owner, then serve with only these grants."""
    await (await PostgresEventStore.open(fresh_postgres_url)).close()
    with limited_role(fresh_postgres_url, "SELECT, INSERT, UPDATE ON snapshots") as as_role:
        store = await PostgresEventStore.open(as_role)
        try:
            appended = await store.append(commit(("a", 1)))
            assert await store.read_all() == appended
            # Snapshots are replaced as streams grow: the one table that is updated.
            for version in (1, 2):
                await store.save_snapshot(Snapshot("a", version, 1, b"{}"))
            assert await store.load_snapshot_and_events("a") == (Snapshot("a", 2, 1, b"{}"), [])
        finally:
            await store.close()


async def test_a_role_without_rights_on_snapshots_still_serves(
    fresh_postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each connection reads the snapshots table once when it opens (below): a role that
    may not is refused nothing but the snapshots, which ``domain.snapshots`` then skips."""
    await (await PostgresEventStore.open(fresh_postgres_url)).close()
    with limited_role(fresh_postgres_url) as as_role:
        store = await PostgresEventStore.open(as_role)
        role = as_role.partition("://")[2].partition("@")[0]
        assert (
            f"the role {role} may not select from snapshots, nor insert into snapshots, nor"
            " update snapshots: snapshots will be skipped; see docs/operations.md, Privileges"
        ) in caplog.messages
        try:
            appended = await store.append(commit(("a", 1)))
            assert await store.read_stream("a") == appended
            with pytest.raises(StoreError):
                await store.load_snapshot_and_events("a")
        finally:
            await store.close()


@pytest.mark.parametrize(
    ("withheld", "refusal"),
    [
        ("INSERT ON events", "insert into events"),
        ("INSERT ON events, commands", "insert into events or commands"),
        ("DELETE ON consumer_group_leases", "delete from consumer_group_leases"),
        # PostgreSQL grants EXECUTE to PUBLIC unless revoked (and then to a role).
        ("EXECUTE ON FUNCTION og_append_chain", "execute og_append_chain()"),
    ],
)
async def test_a_role_without_a_grant_the_gateway_needs_is_refused_when_opened(
    fresh_postgres_url: str, withheld: str, refusal: str
) -> None:
    """Served, every command needing it would fail INTERNAL (permission denied)."""
    await (await PostgresEventStore.open(fresh_postgres_url)).close()
    with limited_role(fresh_postgres_url) as as_role:
        role = as_role.partition("://")[2].partition("@")[0]
        with psycopg.connect(fresh_postgres_url, autocommit=True) as owner:
            owner.execute(f"REVOKE {withheld} FROM {role}, PUBLIC")
        with pytest.raises(StoreError) as raised:
            await (await PostgresEventStore.open(as_role)).close()
    assert str(raised.value) == (
        f"the role {role} may not {refusal}; see docs/operations.md, Privileges"
    )


@pytest.mark.parametrize("migrate", [True, False])
async def test_a_role_that_may_use_no_schema_is_told_so(
    fresh_postgres_url: str, migrate: bool
) -> None:
    """Without USAGE on the schema PostgreSQL finds no table of it and creates nothing
    there: the tables would look absent and a migration fail "no schema has been selected
    to create in", where the grant is what is missing."""
    await (await PostgresEventStore.open(fresh_postgres_url)).close()
    with limited_role(fresh_postgres_url, "SELECT, INSERT, UPDATE ON snapshots") as as_role:
        role = as_role.partition("://")[2].partition("@")[0]
        with psycopg.connect(fresh_postgres_url, autocommit=True) as owner:
            owner.execute("REVOKE USAGE ON SCHEMA public FROM PUBLIC")
        with pytest.raises(StoreError) as raised:
            await (await PostgresEventStore.open(as_role, migrate=migrate)).close()
        with pytest.raises(StoreError, match="may use no schema of its search_path"):
            await PostgresEventStore.holds_a_store(as_role)
    assert str(raised.value) == (
        f'the role {role} may use no schema of its search_path ("$user", public): none of'
        " them exists or grants it USAGE; see docs/operations.md, Privileges"
    )


async def test_a_role_that_may_only_read_is_refused_for_writing_not_for_reading(
    fresh_postgres_url: str,
) -> None:
    """``migrate=False`` is verify's: it reads events and commands, and writes nothing."""
    await (await PostgresEventStore.open(fresh_postgres_url)).close()
    with new_role(
        fresh_postgres_url, "SELECT ON schema_migrations, events, commands, snapshots"
    ) as as_role:
        reader = await PostgresEventStore.open(as_role, migrate=False)
        try:
            assert await reader.read_all() == []
        finally:
            await reader.close()
        with pytest.raises(
            StoreError, match=r"may not insert into events, commands, consumer_groups, "
        ):
            await (await PostgresEventStore.open(as_role)).close()


async def test_a_cold_load_is_one_statement_prepared_before_it_is_needed(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first command on a long stream after a restart reads its snapshot and the
    events after it: one round trip, on a connection that has read those tables and
    prepared that statement when the pool opened it (the first such load on a new
    connection took ~4 ms, the next ones ~0.8)."""
    store = await PostgresEventStore.open(fresh_postgres_url, min_connections=3)
    try:
        for version in (1, 2, 3):
            await store.append(commit(("s", version)))
        await store.save_snapshot(Snapshot("s", 1, 1, b"{}"))
        pool = store._pool  # what each pooled connection holds
        async with pool.connection() as a, pool.connection() as b, pool.connection() as c:
            for connection in (a, b, c):
                cursor = await connection.execute("SELECT statement FROM pg_prepared_statements")
                prepared = [row[0] for row in await cursor.fetchall()]
                assert any("JOIN snapshots" in statement for statement in prepared), prepared

        sent: list[object] = []
        execute = psycopg.AsyncCursor.execute

        async def counted(self: Any, query: Any, *args: Any, **kw: Any) -> Any:
            sent.append(query)
            return await execute(self, query, *args, **kw)

        monkeypatch.setattr(psycopg.AsyncCursor, "execute", counted)
        snapshot, payloads = await store.load_snapshot_and_events("s")
        assert snapshot == Snapshot("s", 1, 1, b"{}")
        assert [version for _, _, version, _ in payloads] == [1, 1]
        assert len(sent) == 1, sent
    finally:
        await store.close()


async def test_a_pooled_connection_plans_each_statement_once(fresh_postgres_url: str) -> None:
    """PostgreSQL would plan a stream's load afresh on each of a connection's first five
    loads, and on every later one for a short stream: a cold load would wait for it."""
    # Two connections: the appends keep one, the loads take the other.
    store = await PostgresEventStore.open(fresh_postgres_url, min_connections=2, max_connections=2)
    try:
        for version in (1, 2, 3):
            await store.append(commit(("s", version)))
        await store.save_snapshot(Snapshot("s", 1, 1, b"{}"))
        for stream in ("s", "t", "s", "u", "s", "s", "s"):
            await store.load_snapshot_and_events(stream)
        async with store._pool.connection() as connection:  # the loads' connection
            cursor = await connection.execute(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement LIKE '%JOIN snapshots%'"
            )
            assert await cursor.fetchall() == [(8, 0)]  # the pool's own load, then ours
    finally:
        await store.close()


async def test_the_append_rehearsed_when_the_store_opens_leaves_nothing(
    fresh_postgres_url: str,
) -> None:
    """The first writer's connection rehearses an append when the store opens, in a
    transaction it rolls back: no event, no command, no position used up."""
    store = await PostgresEventStore.open(fresh_postgres_url, min_connections=4)
    try:
        assert await store.head_position() == 0
        appended = await store.append(commit(("a", 1)))
        assert [e.position for e in appended] == [1]
        assert await store.read_all() == appended
    finally:
        await store.close()
    with psycopg.connect(fresh_postgres_url, autocommit=True) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM commands)"
        )
        assert counts.fetchone() == (1, 1)


async def test_connections_opened_for_reads_do_not_wait_for_the_append_lock(
    fresh_postgres_url: str,
) -> None:
    """A pool growing under reads must not queue its new connections behind every
    replica's appends (nor hold up theirs): only the first writer rehearses an append."""
    store = await PostgresEventStore.open(
        fresh_postgres_url, min_connections=2, max_connections=8, pool_timeout=5.0
    )
    try:
        await store.append(commit(("a", 1)))
        with (
            psycopg.connect(fresh_postgres_url, autocommit=True) as holder,
            holder.transaction(),
        ):
            # Another replica's append, holding the lock for as long as it takes.
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
            # Four reads holding a connection each at once: the pool opens more.
            results = await asyncio.wait_for(reads_at_once(store, 4), 4.0)
        assert results == [1] * 4
        assert store._pool.get_stats()["pool_size"] >= 5
    finally:
        await store.close()


async def reads_at_once(store: PostgresEventStore, count: int) -> list[int]:
    """How many events stream "a" has, read on ``count`` pooled connections held at once."""
    async with contextlib.AsyncExitStack() as stack:
        connections = [
            await stack.enter_async_context(store._pool.connection()) for _ in range(count)
        ]
        counts = []
        for connection in connections:
            cursor = await connection.execute("SELECT count(*) FROM events WHERE stream_id = 'a'")
            row = await cursor.fetchone()
            counts.append(row[0] if row else 0)
        return counts


async def test_loads_at_once_each_read_their_own_stream(store: PostgresEventStore) -> None:
    """One load at a time keeps a connection of its own; the others meanwhile take the
    pool's."""
    for n in range(6):
        for version in range(1, n + 2):
            await store.append(commit((f"s{n}", version)))
    await store.save_snapshot(Snapshot("s5", 2, 1, b"{}"))
    loaded = await asyncio.gather(*(store.load_snapshot_and_events(f"s{n}") for n in range(6)))
    assert [len(payloads) for _, payloads in loaded] == [1, 2, 3, 4, 5, 4]
    assert [snapshot for snapshot, _ in loaded] == [None] * 5 + [Snapshot("s5", 2, 1, b"{}")]


async def test_the_smallest_pool_always_has_a_connection_for_other_reads(
    fresh_postgres_url: str,
) -> None:
    """Two connections carry appends, each kept by its writer; in a pool of three, a load
    keeping the third would leave none for the idempotency lookups and the other reads."""
    store = await PostgresEventStore.open(
        fresh_postgres_url, min_connections=3, max_connections=3, pool_timeout=1.0
    )
    try:
        for round_ in range(10):
            # A second batch sent while the first is in flight takes the second writer.
            first = asyncio.gather(*(store.append(commit((f"a{round_}-{n}", 1))) for n in range(4)))
            await asyncio.sleep(0.001)
            second = asyncio.gather(
                *(store.append(commit((f"b{round_}-{n}", 1))) for n in range(4))
            )
            await asyncio.gather(first, second)
            await store.load_snapshot_and_events(f"a{round_}-0")
            assert len(await store.read_stream(f"b{round_}-0")) == 1
            assert await store.find_command("unknown") is None
    finally:
        await store.close()


async def test_a_lost_load_connection_is_replaced_before_the_next_load(
    store: PostgresEventStore, fresh_postgres_url: str, postgres_url: str
) -> None:
    await store.append(commit(("a", 1)))
    assert len((await store.load_snapshot_and_events("a"))[1]) == 1
    terminate_connections(postgres_url, fresh_postgres_url)
    await until_terminated(postgres_url, fresh_postgres_url)

    assert len((await store.load_snapshot_and_events("a"))[1]) == 1


async def test_a_snapshot_not_followed_by_its_next_version_is_refused(
    store: PostgresEventStore, fresh_postgres_url: str
) -> None:
    """The load sends the snapshot's data with the event right after its version: with
    that event missing (a damaged log), the snapshot is refused, never read as empty."""
    for version in (1, 2, 3):
        await store.append(commit(("s", version)))
    await store.save_snapshot(Snapshot("s", 1, 1, b"{}"))
    with psycopg.connect(fresh_postgres_url, autocommit=True) as admin:
        admin.execute("DELETE FROM events WHERE stream_id = 's' AND stream_version = 2")
    with pytest.raises(StoreError):
        await store.load_snapshot_and_events("s")


# -- positions are seen in commit order ---------------------------------------------


async def _write_many(url: str, writer: str, tasks: int, commits: int) -> int:
    """``tasks`` tasks appending ``commits`` commits each, every task through a store of
    its own: a store sends few batches at a time, and the race needs many transactions."""
    stores = [await PostgresEventStore.open(url, min_connections=1) for _ in range(tasks)]
    try:

        async def one_task(task: int) -> None:
            stream = f"{writer}-{task}"
            for n in range(1, commits + 1):
                await stores[task].append(commit((stream, n), (f"{stream}-side-{n}", 1)))

        await asyncio.gather(*(one_task(t) for t in range(tasks)))
    finally:
        for store in stores:
            await store.close()
    return tasks * commits * 2


def write_many_in_process(url: str, writer: str, tasks: int, commits: int) -> int:
    return asyncio.run(_write_many(url, writer, tasks, commits))


async def test_a_tailing_reader_never_skips_an_event_of_concurrent_processes(
    store: PostgresEventStore, fresh_postgres_url: str
) -> None:
    """The bug sequence-based stores ship: a reader at position N later misses an event
    below N that committed late. Every event the writers commit must reach the tailer."""
    processes, tasks, commits = 3, 6, 20
    loop = asyncio.get_running_loop()
    seen: list[RecordedEvent] = []

    async def tail_until(done: asyncio.Future[list[int]]) -> None:
        while True:
            finished = done.done()
            page = await store.read_all(seen[-1].position if seen else 0, 25)
            seen.extend(page)
            if finished and not page:
                return
            if not page:
                await asyncio.sleep(0.001)

    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        writers = asyncio.gather(
            *(
                loop.run_in_executor(
                    pool, write_many_in_process, fresh_postgres_url, f"w{p}", tasks, commits
                )
                for p in range(processes)
            )
        )
        await asyncio.wait_for(tail_until(writers), TIMEOUT)
        written = sum(await writers)

    everything = await store.read_all(0, written + 1)
    assert [e.position for e in everything] == list(range(1, written + 1))
    assert seen == everything


# -- group commit: each commit of a batch succeeds or fails alone -------------------


async def test_commits_sent_together_succeed_or_fail_each_on_its_own(
    store: PostgresEventStore,
) -> None:
    before = [
        *await store.append(commit(("contended", 1))),
        *await store.append(known := commit(("known", 1))),
    ]
    good = [commit((f"good-{n}", 1)) for n in range(8)]
    stale = commit(("contended", 1))
    replayed = commit(("other", 1), command_id=known.command_id)
    racers = [commit(("race", 1)) for _ in range(2)]
    # A NUL character is refused by the driver: it must fail only its own commit.
    unstorable = commit(("nul", 1), user_id="bad\x00user")
    # Interleaved, so that rejected commits sit between appended ones in one batch.
    attempts = [
        *(good[0], stale, good[1], replayed, good[2], racers[0], good[3]),
        *(racers[1], good[4], unstorable, good[5], good[6], good[7]),
    ]

    results = await asyncio.wait_for(
        asyncio.gather(*(store.append(c) for c in attempts), return_exceptions=True), TIMEOUT
    )
    outcome = dict(zip((id(c) for c in attempts), results, strict=True))

    assert all(isinstance(outcome[id(c)], list) for c in good)
    assert isinstance(outcome[id(stale)], ConcurrencyConflictError)
    assert isinstance(outcome[id(replayed)], DuplicateCommandError)
    race = sorted(type(outcome[id(c)]).__name__ for c in racers)
    assert race == ["ConcurrencyConflictError", "list"]
    failure = outcome[id(unstorable)]
    assert isinstance(failure, StoreError) and not isinstance(failure, psycopg.Error)
    assert isinstance(failure.__cause__, psycopg.Error)
    # What each append returned is exactly what was stored, positions without a gap.
    returned = sorted(
        (e for result in results if isinstance(result, list) for e in result),
        key=lambda e: e.position,
    )
    assert await store.read_all() == [*before, *returned]
    assert [e.position for e in returned] == list(range(3, 3 + len(good) + 1))


async def test_a_stricter_default_isolation_level_changes_nothing(fresh_postgres_url: str) -> None:
    """Positions are assigned under the append lock by a READ COMMITTED read; a database
    defaulting to SERIALIZABLE must not turn concurrent appends into failures."""
    database = fresh_postgres_url.rpartition("/")[2]
    with psycopg.connect(fresh_postgres_url, autocommit=True) as owner:
        owner.execute(
            f'ALTER DATABASE "{database}" SET default_transaction_isolation = serializable'
        )
    replicas = [await PostgresEventStore.open(fresh_postgres_url) for _ in range(2)]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(replicas[n % 2].append(commit((f"s-{n}", 1))) for n in range(30))),
            TIMEOUT,
        )
    finally:
        for replica in replicas:
            await replica.close()
    assert sorted(e.position for result in results for e in result) == list(range(1, 31))


# -- stream locks shared by replicas --------------------------------------------------


async def test_a_stream_lock_waited_for_comes_with_what_its_holder_appended(
    store: PostgresEventStore, fresh_postgres_url: str
) -> None:
    """A replica's turn begins with one round trip: the lock, and the events the replica
    has not seen, read once the previous holder let go (so its last appends included)."""
    other = await PostgresEventStore.open(fresh_postgres_url)
    try:
        await store.append(commit(("hot", 1)))
        held = await store.lock_stream("hot", 1)
        assert (held.waited, held.events_after) == (False, [])

        waiting = asyncio.create_task(other.lock_stream("hot", 1))
        appended = await store.append(commit(("hot", 2)))
        appended += await store.append(commit(("hot", 3)))
        await asyncio.sleep(0.1)
        assert not waiting.done(), "the other replica waits for the lock"
        await store.unlock_stream("hot")
        locked = await asyncio.wait_for(waiting, TIMEOUT)
        assert locked.waited
        assert locked.events_after == appended
        await other.unlock_stream("hot")

        plain = await other.lock_stream("hot")
        assert (plain.waited, plain.events_after) == (False, None), "no version, no read"
        await other.unlock_stream("hot")
    finally:
        await other.close()


# -- LISTEN/NOTIFY between replicas -------------------------------------------------


async def test_a_commit_through_one_replica_wakes_the_other(
    store: PostgresEventStore, fresh_postgres_url: str
) -> None:
    other = await PostgresEventStore.open(fresh_postgres_url)
    try:
        woke = asyncio.Event()
        other.add_commit_listener(woke.set)

        # The first wake-up may come from the LISTEN connection's start; after it, the
        # connection is listening, so the second can only come through NOTIFY.
        for version in (1, 2):
            woke.clear()
            appended = await store.append(commit(("a", version)))
            await asyncio.wait_for(woke.wait(), TIMEOUT)
            assert await other.head_position() >= appended[-1].position
    finally:
        await other.close()


async def test_the_listener_reconnects_after_its_connection_is_killed(
    store: PostgresEventStore, fresh_postgres_url: str, postgres_url: str
) -> None:
    other = await PostgresEventStore.open(fresh_postgres_url)
    database = fresh_postgres_url.rpartition("/")[2]
    try:
        woke = asyncio.Event()
        other.add_commit_listener(woke.set)
        await store.append(commit(("a", 1)))
        await asyncio.wait_for(woke.wait(), TIMEOUT)

        with psycopg.connect(postgres_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND application_name = %s",
                (database, LISTENER_APPLICATION_NAME),
            ).fetchall()
        assert killed
        woke.clear()
        appended = await store.append(commit(("a", 2)))

        await asyncio.wait_for(woke.wait(), TIMEOUT)
        assert await other.head_position() >= appended[-1].position
    finally:
        await other.close()


# -- driver errors never leave the store --------------------------------------------


async def test_an_unreachable_server_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailableError) as raised:
        await PostgresEventStore.open("postgresql://postgres@127.0.0.1:1/postgres")
    assert isinstance(raised.value.__cause__, psycopg.Error)


@pytest.mark.parametrize("hosts", ["127.0.0.1:1", "127.0.0.1:1,127.0.0.1:2"])
async def test_an_unreachable_server_is_reported_on_one_line(hosts: str) -> None:
    """libpq puts its hint on a line of its own, and psycopg each host it tried on one
    more: the command line prints one line per error."""
    with pytest.raises(StoreUnavailableError) as raised:
        await PostgresEventStore.open(f"postgresql://postgres:s3cret@{hosts}/postgres")
    message = str(raised.value)
    assert "\n" not in message and "\t" not in message
    assert "port 1 failed: Connection refused; Is the server running" in message
    assert "s3cret" not in message


async def test_a_value_libpq_refuses_for_several_hosts_is_reported_on_one_line() -> None:
    """psycopg lists libpq's complaint once for each host, a line each."""
    with pytest.raises(StoreURLError) as raised:
        await PostgresEventStore.open(
            "postgresql://postgres:s3cret@127.0.0.1:1,127.0.0.1:2/postgres?sslmode=bogus"
        )
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(
        "invalid PostgreSQL store URL 'postgresql://postgres:***@127.0.0.1:1,127.0.0.1:2/"
        'postgres?sslmode=bogus\': invalid sslmode value: "bogus"; Multiple connection'
    )
    assert "s3cret" not in message


class Outage:
    """A TCP proxy in front of PostgreSQL that can go down as a stopped server does: its
    connections cut, new ones refused (nothing listens on its port), and come back."""

    def __init__(self, url: str) -> None:
        info = psycopg.conninfo.conninfo_to_dict(url)
        self._upstream = (str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432))
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._links):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
        self._links |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()
            self._links.discard(sink)

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


@contextlib.asynccontextmanager
async def store_behind_outage(url: str) -> AsyncIterator[tuple[PostgresEventStore, Outage]]:
    """A store that reaches the database through an ``Outage``, one event appended."""
    outage = Outage(url)
    await outage.up()
    store = await PostgresEventStore.open(make_conninfo(url, host="127.0.0.1", port=outage.port))
    try:
        await store.append(commit(("a", 1)))
        yield store, outage
    finally:
        await store.close()


async def test_calls_fail_at_once_while_the_database_refuses_connections(
    fresh_postgres_url: str,
) -> None:
    # Each call waited the pool's whole timeout (10 s) for a connection that could not
    # come: clients with shorter deadlines saw DEADLINE_EXCEEDED, and the store's fault
    # (its metric and log line, which alerts read) was never reported.
    async with store_behind_outage(fresh_postgres_url) as (store, outage):
        await outage.down()
        started = asyncio.get_running_loop().time()
        refusals: list[str] = []
        for version in range(2, 7):
            with pytest.raises(StoreUnavailableError) as refused:
                await store.append(commit(("a", version)))
            refusals.append(str(refused.value))
        with pytest.raises(StoreUnavailableError) as refused:
            await store.read_all()
        refusals.append(str(refused.value))
        assert asyncio.get_running_loop().time() - started < 5
        # What happened, not a pool timeout (which points at the pool's size).
        assert "the database refused a connection" in refusals[-1]
        assert not [r for r in refusals if "couldn't get a connection" in r], refusals

        await outage.up()
        for _ in range(int(TIMEOUT / 0.1)):
            try:
                appended = await store.append(commit(("a", 2)))
                break
            except StoreUnavailableError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the store never saw the database again")
        assert [e.stream_version for e in appended] == [2]


async def test_calls_work_again_soon_after_the_database_is_back_whatever_the_pool_s_backoff(
    fresh_postgres_url: str,
) -> None:
    # The pool replaces the connections it lost with attempts 1, 2, 4 ... s apart; a call
    # that found the database back waited for the next one: 3.5 s after this outage.
    loop = asyncio.get_running_loop()
    async with store_behind_outage(fresh_postgres_url) as (store, outage):
        await outage.down()
        # Down long enough for the pool's attempts to be 4 s apart when it comes back.
        down_until = loop.time() + 3.5
        while loop.time() < down_until:
            with pytest.raises(StoreUnavailableError):
                await store.append(commit(("a", 2)))
            await asyncio.sleep(0.1)
        await outage.up()
        back = loop.time()
        while True:
            try:
                appended = await store.append(commit(("a", 2)))
                break
            except StoreUnavailableError:
                assert loop.time() - back < TIMEOUT
                await asyncio.sleep(0.1)
        # A second for the last refusal to go stale, then the call's own try.
        assert loop.time() - back < 2.5
        assert [e.stream_version for e in appended] == [2]


async def test_snapshot_writes_held_up_by_a_lock_leave_the_pool_to_the_commands(
    fresh_postgres_url: str,
) -> None:
    # Snapshots are written in the background; written side by side, those that another
    # session's lock on the snapshots table (a CREATE INDEX, a row lock) held up took every
    # pooled connection, and every command that needed one to read waited for the lock.
    store = await PostgresEventStore.open(fresh_postgres_url, max_connections=5)
    snapshots = Snapshots(store, 2)
    bus = bootstrap(store, snapshots=snapshots)
    try:
        with psycopg.connect(fresh_postgres_url, autocommit=True) as locker:
            locker.execute("BEGIN")
            locker.execute("LOCK TABLE snapshots IN SHARE MODE")
            for product in range(10):
                for _ in range(2):  # a snapshot is due at version 2 of each
                    await bus.dispatch(RestockProduct(product_id=f"p-{product}", quantity=1))
            await asyncio.sleep(0.5)
            async with asyncio.timeout(5):
                assert len(await store.read_all()) == 20
                assert len(await store.read_stream("product-p-3")) == 2
            locker.execute("COMMIT")
        await snapshots.drain()
        saved = await store.load_snapshot("product-p-9")
        assert saved is not None and saved.stream_version == 2
    finally:
        await store.close()


async def test_connections_the_server_closed_while_idle_are_replaced_before_use(
    store: PostgresEventStore, fresh_postgres_url: str, postgres_url: str
) -> None:
    # The writer keeps the connection of its appends, the pool those of the reads.
    await store.append(commit(("a", 1)))
    assert len(await store.read_all()) == 1
    terminate_connections(postgres_url, fresh_postgres_url)
    await until_terminated(postgres_url, fresh_postgres_url)

    # As after a restart that is over: each operation works at its first try.
    assert len(await store.read_all()) == 1
    appended = await store.append(commit(("a", 2)))
    assert [e.stream_version for e in await store.read_stream("a")] == [1, 2]
    assert await store.head_position() == appended[-1].position


async def test_an_idle_connection_the_server_wrote_to_without_closing_it_is_kept(
    fresh_postgres_url: str,
) -> None:
    """Only a closed connection is dropped: one that got a message while idle (here a
    notification) is read and kept, as it is."""
    async with await psycopg.AsyncConnection.connect(fresh_postgres_url, autocommit=True) as conn:
        await conn.execute("LISTEN og_test")
        with psycopg.connect(fresh_postgres_url, autocommit=True) as other:
            other.execute("NOTIFY og_test")
        for _ in range(int(TIMEOUT / 0.01)):
            if select.select([conn.pgconn.socket], [], [], 0)[0]:
                break
            await asyncio.sleep(0.01)
        assert not closed_by_server(conn)
        assert await (await conn.execute("SELECT 1")).fetchone() == (1,)

        with psycopg.connect(fresh_postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        for _ in range(int(TIMEOUT / 0.01)):
            if closed_by_server(conn):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the closed connection was never seen as closed")


async def test_a_connection_on_a_descriptor_above_1024_is_checked_too(
    fresh_postgres_url: str,
) -> None:
    """A server with many clients gives its database sockets high descriptors, which
    select() cannot watch: such a connection must not be taken for closed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1100
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"at most {hard} open files allowed here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    fillers: list[int] = []
    try:
        while not fillers or fillers[-1] < 1030:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        async with await psycopg.AsyncConnection.connect(fresh_postgres_url) as conn:
            assert conn.pgconn.socket > 1024
            assert not closed_by_server(conn)
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
    finally:
        for filler in fillers:
            os.close(filler)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_connection_lost_while_in_use_is_store_unavailable(
    store: PostgresEventStore, fresh_postgres_url: str, postgres_url: str
) -> None:
    database = fresh_postgres_url.rpartition("/")[2]
    with psycopg.connect(fresh_postgres_url, autocommit=True) as blocker:
        # The append waits for this lock on the events table, in its statement, when
        # its connection is terminated.
        blocker.execute("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        appending = asyncio.create_task(store.append(commit(("a", 1))))
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            for _ in range(int(TIMEOUT / 0.05)):
                waiting = admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s"
                    " AND wait_event_type = 'Lock' AND pid <> %s",
                    (database, blocker.info.backend_pid),
                ).fetchall()
                if waiting:
                    break
                await asyncio.sleep(0.05)
            assert waiting, "the append never waited for the lock"
            admin.execute("SELECT pg_terminate_backend(%s)", waiting[0])
        with pytest.raises(StoreUnavailableError):
            await appending
        blocker.execute("ROLLBACK")

    async def appends_again() -> None:
        await store.append(commit(("a", 1)))

    # The pool replaces the dead connection: the store recovers on its own.
    await until_reconnected(appends_again)


async def test_other_database_errors_are_store_errors_without_sql(
    store: PostgresEventStore, fresh_postgres_url: str
) -> None:
    with psycopg.connect(fresh_postgres_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE events RENAME TO events_moved")

    for operation in (store.read_all(), store.append(commit(("a", 1)))):
        with pytest.raises(StoreError) as raised:
            await operation
        assert not isinstance(raised.value, StoreUnavailableError)
        assert isinstance(raised.value.__cause__, psycopg.Error)
        assert "SELECT" not in str(raised.value)


# -- two gateways, one database -----------------------------------------------------


@pytest.fixture
async def two_gateways(fresh_postgres_url: str) -> AsyncIterator[tuple[Clients, Clients]]:
    settings = Settings(listen="127.0.0.1:0", store=fresh_postgres_url)
    gateways = [
        await create_server(settings, store=await PostgresEventStore.open(fresh_postgres_url))
        for _ in range(2)
    ]
    channels = []
    try:
        for gateway in gateways:
            await gateway.start()
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}"))
        first, second = (
            Clients(
                channel=channel,
                orders=order_command_service_pb2_grpc.OrderCommandServiceStub(channel),
                inventory=inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel),
                events=event_stream_service_pb2_grpc.EventStreamServiceStub(channel),
            )
            for channel in channels
        )
        yield first, second
    finally:
        for channel in channels:
            await channel.close()
        for gateway in gateways:
            await gateway.stop()


async def test_two_gateways_on_one_database_never_oversell(
    two_gateways: tuple[Clients, Clients], fresh_postgres_url: str
) -> None:
    first, second = two_gateways
    await first.restock("hot", 20)

    async def order(clients: Clients) -> tuple[grpc.StatusCode, list[events_pb2.Event]]:
        request = order_request(item("hot", 1), command_id=str(uuid.uuid4()))
        for _ in range(50):
            try:
                return grpc.StatusCode.OK, await clients.create(request)
            except grpc.aio.AioRpcError as error:
                # ABORTED promises a retry is safe; the same command_id makes it idempotent.
                if error.code() != grpc.StatusCode.ABORTED:
                    return error.code(), []
        raise AssertionError("an order was aborted 50 times")

    results = await asyncio.wait_for(
        asyncio.gather(*(order(first if n % 2 else second) for n in range(50))), TIMEOUT
    )

    codes = [code for code, _ in results]
    assert codes.count(grpc.StatusCode.OK) == 20
    assert codes.count(grpc.StatusCode.FAILED_PRECONDITION) == 30
    available_after = sorted(
        event.stock_reserved.available_after
        for _, events in results
        for event in events
        if event.event_type == "StockReserved"
    )
    assert available_after == list(range(20))
    store = await PostgresEventStore.open(fresh_postgres_url)
    try:
        hot = await store.read_stream("product-hot")
        report = await verify(store)
    finally:
        await store.close()
    assert report.ok, report.lines()
    reserved = [e for e in hot if e.event_type == "StockReserved"]
    assert len(reserved) == 20
    assert [e.stream_version for e in hot] == list(range(1, 22))


async def test_a_sold_out_product_reports_the_stock_left(
    two_gateways: tuple[Clients, Clients],
) -> None:
    first, second = two_gateways
    await first.restock("scarce", 1)
    await second.create(order_request(item("scarce", 1)))

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await first.create(order_request(item("scarce", 1)))

    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    failure = detail(raised.value, error_details_pb2.PreconditionFailure)
    assert failure.violations[0].description == "requested 1, available 0"


async def test_text_is_stored_as_sent_whatever_the_client_encoding_setting(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Appends send their text in binary arrays of UTF-8: a session left in another
    # encoding (PGCLIENTENCODING, a role's setting) had the server read them as that one,
    # and "José" came back "JosÃ©".
    monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    store = await PostgresEventStore.open(fresh_postgres_url)
    try:
        await store.append(commit_of([("product-a", 1)], user_id="José", correlation_id="Ελλάδα"))
        (event,) = await store.read_all(0, 10)
    finally:
        await store.close()
    assert (event.user_id, event.correlation_id) == ("José", "Ελλάδα")


async def test_a_database_that_cannot_hold_every_text_is_refused(
    postgres_url: str,
) -> None:
    latin1 = "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    with (
        new_database(postgres_url, latin1, prefix="test_latin1") as url,
        pytest.raises(StoreError, match="encoding is LATIN1"),
    ):
        await PostgresEventStore.open(url)


def test_a_client_encoding_other_than_utf8_is_refused() -> None:
    with pytest.raises(StoreURLError, match="client_encoding 'LATIN1'"):
        _connect_kwargs("postgresql://gw@db/orders?client_encoding=LATIN1")
    utf8 = _connect_kwargs("postgresql://gw@db/orders?client_encoding=utf-8")
    assert utf8["client_encoding"] == "UTF8"
