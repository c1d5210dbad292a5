"""Consumer-group records in memory, beside ``MemoryEventStore`` (tests)."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence

from server.consumer_groups.model import FailedAttempts, GroupRecord, ParkedEvent


class MemoryConsumerGroupStore:
    def __init__(self) -> None:
        self._groups: dict[str, GroupRecord] = {}
        self._checkpoints: dict[str, dict[int, int]] = {}
        self._parked: dict[str, dict[str, ParkedEvent]] = {}
        self._attempts: dict[str, dict[str, FailedAttempts]] = {}

    async def create_group(self, record: GroupRecord) -> GroupRecord:
        return self._groups.setdefault(record.name, record)

    async def get_group(self, name: str) -> GroupRecord | None:
        return self._groups.get(name)

    async def list_groups(self) -> list[GroupRecord]:
        return [self._groups[name] for name in sorted(self._groups)]

    async def delete_group(self, name: str) -> bool:
        self._checkpoints.pop(name, None)
        self._parked.pop(name, None)
        self._attempts.pop(name, None)
        return self._groups.pop(name, None) is not None

    async def load_checkpoints(self, name: str) -> dict[int, int]:
        return dict(self._checkpoints.get(name, {}))

    def _is_current(self, group: GroupRecord) -> bool:
        """The group of ``group``'s name is the one created then (not deleted since)."""
        stored = self._groups.get(group.name)
        return stored is not None and stored.created_at == group.created_at

    async def save_checkpoints(self, group: GroupRecord, checkpoints: Mapping[int, int]) -> None:
        if not self._is_current(group):
            return
        stored = self._checkpoints.setdefault(group.name, {})
        for partition, position in checkpoints.items():
            stored[partition] = max(stored.get(partition, 0), position)

    async def save_attempts(self, group: GroupRecord, attempts: Sequence[FailedAttempts]) -> None:
        if not self._is_current(group):
            return
        stored = self._attempts.setdefault(group.name, {})
        for failed in attempts:
            before = stored.get(failed.event_id)
            # The latest failure's wait goes with its count.
            if before is None or before.attempts <= failed.attempts:
                stored[failed.event_id] = failed

    async def forget_attempts(self, group: GroupRecord, event_ids: Sequence[str]) -> None:
        if self._is_current(group):
            self._forget(group.name, event_ids)

    def _forget(self, name: str, event_ids: Sequence[str]) -> None:
        stored = self._attempts.get(name, {})
        for event_id in event_ids:
            stored.pop(event_id, None)

    async def load_attempts(self, name: str, partitions: Collection[int]) -> list[FailedAttempts]:
        wanted = set(partitions)
        return [a for a in self._attempts.get(name, {}).values() if a.partition in wanted]

    async def park(self, group: GroupRecord, events: Sequence[ParkedEvent]) -> None:
        if not self._is_current(group):
            return
        parked = self._parked.setdefault(group.name, {})
        for event in events:
            parked[event.event_id] = dataclasses.replace(event, replaying=False)
        self._forget(group.name, [event.event_id for event in events])

    async def unpark(self, group: GroupRecord, event_ids: Sequence[str]) -> None:
        if not self._is_current(group):
            return
        parked = self._parked.get(group.name, {})
        for event_id in event_ids:
            parked.pop(event_id, None)
        self._forget(group.name, event_ids)

    async def replay_parked(self, name: str, limit: int) -> int:
        parked = self._parked.get(name, {})
        waiting = sorted(
            (event for event in parked.values() if not event.replaying),
            key=lambda event: (event.parked_at, event.position),
        )
        chosen = waiting[:limit] if limit else waiting
        for event in chosen:
            parked[event.event_id] = dataclasses.replace(event, replaying=True)
        self._forget(name, [event.event_id for event in chosen])
        return len(chosen)

    async def replaying(self, name: str, limit: int) -> list[ParkedEvent]:
        return sorted(
            (event for event in self._parked.get(name, {}).values() if event.replaying),
            key=lambda event: (event.parked_at, event.position),
        )[:limit]

    async def lowest_replaying(self, name: str) -> dict[int, int]:
        lowest: dict[int, int] = {}
        for event in self._parked.get(name, {}).values():
            if event.replaying:
                lowest[event.partition] = min(
                    event.position, lowest.get(event.partition, event.position)
                )
        return lowest

    async def parked_after(self, name: str, after: Mapping[int, int]) -> list[tuple[int, str]]:
        return [
            (event.partition, event.event_id)
            for event in self._parked.get(name, {}).values()
            if event.partition in after and event.position > after[event.partition]
        ]

    async def parked_count(self, name: str) -> int:
        return sum(not event.replaying for event in self._parked.get(name, {}).values())

    async def close(self) -> None:
        return None
