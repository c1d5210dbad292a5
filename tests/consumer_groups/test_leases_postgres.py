"""PostgreSQL's member and lease records (``PostgresLeases``) against the real database."""

from __future__ import annotations

import datetime as dt

import pytest

from server.consumer_groups.leases import LocalMember
from server.consumer_groups.model import GroupRecord, GroupSettings, MemberIdTakenError
from server.stores.postgres import PostgresEventStore


async def test_a_round_listed_before_a_member_joined_keeps_its_id_taken(
    fresh_postgres_url: str,
) -> None:
    # A replica's lease round lists its members and then forgets its other rows; a member
    # that registered after the list was taken must not lose its row, or another replica
    # could join under the same id until the next round.
    store = await PostgresEventStore.open(fresh_postgres_url)
    try:
        groups = await store.open_consumer_groups()
        now = dt.datetime.now(dt.UTC)
        await groups.create_group(GroupRecord("g", GroupSettings(), now, 0))
        replica_a, replica_b = groups.partition_leases(), groups.partition_leases()
        await replica_a.register("g", "a", LocalMember("the-one", "user", now, 0))
        await replica_a.round("g", "a", [], [], {})
        with pytest.raises(MemberIdTakenError):
            await replica_b.register("g", "b", LocalMember("the-one", "user", now, 0))
    finally:
        await store.close()


async def test_a_departed_member_s_id_is_free_on_its_own_replica_at_once(
    fresh_postgres_url: str,
) -> None:
    # A member that reconnects at once to the replica it left was refused ALREADY_EXISTS
    # until its row expired (each refusal kept the row from the round that deletes it),
    # while its partitions stood idle.
    store = await PostgresEventStore.open(fresh_postgres_url)
    try:
        groups = await store.open_consumer_groups()
        now = dt.datetime.now(dt.UTC)
        await groups.create_group(GroupRecord("g", GroupSettings(), now, 0))
        replica_a, replica_b = groups.partition_leases(), groups.partition_leases()
        stable = LocalMember("stable", "user", now, 0)
        await replica_a.register("g", "a", stable)
        await replica_a.round("g", "a", [stable], [], {})
        await replica_a.register("g", "a", stable)
        with pytest.raises(MemberIdTakenError):
            await replica_b.register("g", "b", stable)
        live, _, _ = await replica_a.round("g", "a", [stable], [], {})
        assert [(m.member_id, m.replica_id) for m in live] == [("stable", "a")]
    finally:
        await store.close()
