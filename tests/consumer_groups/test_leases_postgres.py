"""PostgreSQL's member and lease records (``PostgresLeases``) against the real database."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest

from server.consumer_groups.leases import LeaseStore, LocalMember
from server.consumer_groups.model import GroupRecord, GroupSettings, MemberIdTakenError
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
