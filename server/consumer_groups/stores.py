"""The consumer-group records that go with an event store."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from domain.ports import EventStore
from server.consumer_groups.leases import LeaseStore
from server.consumer_groups.model import GroupRecord, GroupsNeedOneWriterError, ParkedEvent
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


class RefusedConsumerGroupStore:
    """Groups where they cannot be served: every call fails with
    ``GroupsNeedOneWriterError`` (a SQLite store behind several worker processes)."""

    async def create_group(self, record: GroupRecord) -> GroupRecord:
        raise GroupsNeedOneWriterError

    async def get_group(self, name: str) -> GroupRecord | None:
        raise GroupsNeedOneWriterError

    async def list_groups(self) -> list[GroupRecord]:
        raise GroupsNeedOneWriterError

    async def delete_group(self, name: str) -> bool:
        raise GroupsNeedOneWriterError

    async def load_checkpoints(self, name: str) -> dict[int, int]:
        raise GroupsNeedOneWriterError

    async def save_checkpoints(self, name: str, checkpoints: Mapping[int, int]) -> None:
        raise GroupsNeedOneWriterError

    async def park(self, name: str, events: Sequence[ParkedEvent]) -> None:
        raise GroupsNeedOneWriterError

    async def unpark(self, name: str, event_ids: Sequence[str]) -> None:
        raise GroupsNeedOneWriterError

    async def replay_parked(self, name: str, limit: int) -> int:
        raise GroupsNeedOneWriterError

    async def replaying(self, name: str, limit: int) -> list[ParkedEvent]:
        raise GroupsNeedOneWriterError

    async def parked_count(self, name: str) -> int:
        raise GroupsNeedOneWriterError

    async def close(self) -> None:
        return None
