"""The consumer-group records that go with an event store."""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

from domain.ports import EventStore
from server.consumer_groups.leases import LeaseStore
from server.consumer_groups.ports import ConsumerGroupStore
from server.consumer_groups.store_memory import MemoryConsumerGroupStore

log = logging.getLogger("order_gateway.consumer_groups")


@runtime_checkable
class KeepsConsumerGroups(Protocol):
    async def open_consumer_groups(self) -> ConsumerGroupStore: ...


@runtime_checkable
class SharesPartitions(Protocol):
    def partition_leases(self) -> LeaseStore: ...


def partition_leases(store: ConsumerGroupStore) -> LeaseStore | None:
    """Leases for a store shared by replicas (PostgreSQL); None for one process's."""
    return store.partition_leases() if isinstance(store, SharesPartitions) else None


async def open_group_store(events: EventStore) -> ConsumerGroupStore:
    """The memory, SQLite and PostgreSQL stores keep groups beside their events; any
    other store (a test double) gets them in memory, said in the log."""
    if isinstance(events, KeepsConsumerGroups):
        return await events.open_consumer_groups()
    log.warning("%s keeps no consumer groups: they live in memory", type(events).__name__)
    return MemoryConsumerGroupStore()
