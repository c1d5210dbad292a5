"""PostgreSQL's member and lease records (``PostgresLeases``) against the real database."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg.types.json import Jsonb

from server.consumer_groups.leases import LeaseStore, LocalMember
from server.consumer_groups.model import GroupRecord, GroupSettings, MemberIdTakenError
from server.consumer_groups.records import settings_fields
from server.consumer_groups.store_postgres import PostgresLeases
from server.stores.postgres import PostgresEventStore

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
async def replicas(fresh_postgres_url: str) -> AsyncIterator[tuple[LeaseStore, LeaseStore]]:
    """Group "g" and the lease records of two replicas sharing its database."""
    store = await PostgresEventStore.open(fresh_postgres_url)
    try:
        groups = await store.open_consumer_groups()
        await groups.create_group(GroupRecord("g", GroupSettings(), NOW, 0))
        yield groups.partition_leases(), groups.partition_leases()
    finally:
        await store.close()


async def test_a_round_listed_before_a_member_joined_keeps_its_id_taken(
    replicas: tuple[LeaseStore, LeaseStore],
) -> None:
    # A replica's lease round lists its members and then forgets its other rows; a member
    # that registered after the list was taken must not lose its row, or another replica
    # could join under the same id until the next round.
    replica_a, replica_b = replicas
    await replica_a.register("g", "a", LocalMember("the-one", "user", NOW, 0))
    await replica_a.round("g", "a", [], [], {})
    with pytest.raises(MemberIdTakenError):
        await replica_b.register("g", "b", LocalMember("the-one", "user", NOW, 0))


async def test_a_departed_member_s_id_is_free_on_its_own_replica_at_once(
    replicas: tuple[LeaseStore, LeaseStore],
) -> None:
    # A member that reconnects at once to the replica it left was refused ALREADY_EXISTS
    # until its row expired (each refusal kept the row from the round that deletes it),
    # while its partitions stood idle.
    replica_a, replica_b = replicas
    stable = LocalMember("stable", "user", NOW, 0)
    await replica_a.register("g", "a", stable)
    await replica_a.round("g", "a", [stable], [], {})
    await replica_a.register("g", "a", stable)
    with pytest.raises(MemberIdTakenError):
        await replica_b.register("g", "b", stable)
    live, _, _ = await replica_a.round("g", "a", [stable], [], {})
    assert [(m.member_id, m.replica_id) for m in live] == [("stable", "a")]


async def test_a_leave_takes_its_group_s_row_before_its_members_as_a_deletion_does(
    replicas: tuple[LeaseStore, LeaseStore], fresh_postgres_url: str
) -> None:
    # A deletion of the group takes the group's row, then (by cascade) its members' and
    # leases' rows. A leave that took its leases' rows first and then waited for its
    # members' deadlocked with a deletion through another replica: PostgreSQL failed one
    # of them, and a failed deletion answered INTERNAL.
    replica_a, _ = replicas
    member = LocalMember("m", "user", NOW, 0)
    await replica_a.register("g", "a", member)
    await replica_a.round("g", "a", [member], [], {0: "m"})
    async with await psycopg.AsyncConnection.connect(fresh_postgres_url) as deleting:
        await deleting.execute("SELECT 1 FROM consumer_groups WHERE name = 'g' FOR UPDATE")
        leaving = asyncio.ensure_future(replica_a.leave("g", "a"))
        await asyncio.sleep(0.3)
        assert not leaving.done(), "the leave must wait for the group's row first"
        await deleting.execute("DELETE FROM consumer_groups WHERE name = 'g'")
        await deleting.commit()
    await asyncio.wait_for(leaving, 10)


async def test_a_create_that_meets_a_group_created_meanwhile_answers_that_group(
    fresh_postgres_url: str,
) -> None:
    # The create's statement began before the other create committed: its insert finds
    # the group, and its read (of the statement's snapshot, taken before) did not, so it
    # answered nothing (INTERNAL: an IndexError).
    store = await PostgresEventStore.open(fresh_postgres_url)
    try:
        groups = await store.open_consumer_groups()
        async with await psycopg.AsyncConnection.connect(fresh_postgres_url) as other:
            await other.execute(
                "INSERT INTO consumer_groups (name, settings, created_at, start_position)"
                " VALUES ('g', %s, %s, 7)",
                (Jsonb(settings_fields(GroupSettings())), NOW - dt.timedelta(hours=1)),
            )
            creating = asyncio.ensure_future(
                groups.create_group(GroupRecord("g", GroupSettings(), NOW, 0))
            )
            await asyncio.sleep(0.3)
            await other.commit()
        created = await asyncio.wait_for(creating, 10)
    finally:
        await store.close()
    assert (created.start_position, created.created_at) == (7, NOW - dt.timedelta(hours=1))


async def test_groups_used_and_deleted_leave_no_state_behind(fresh_postgres_url: str) -> None:
    # A replica whose clients create, consume and delete short-lived groups kept a lock
    # and a record of joining members per group name ever used, for good.
    store = await PostgresEventStore.open(fresh_postgres_url)
    try:
        groups = await store.open_consumer_groups()
        leases = groups.partition_leases()
        assert isinstance(leases, PostgresLeases)
        for n in range(50):
            name = f"short-lived-{n}"
            await groups.create_group(GroupRecord(name, GroupSettings(), NOW, 0))
            member = LocalMember("m", "user", NOW, 0)
            await leases.register(name, "a", member)
            if n % 2:
                await leases.round(name, "a", [member], [], {0: "m"})
            await leases.leave(name, "a")
            assert await groups.delete_group(name)
        assert (len(leases._joining), len(leases._rounds)) == (0, 0)
    finally:
        await store.close()
