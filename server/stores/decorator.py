"""A base for ``EventStore`` decorators: delegates everything, subclasses wrap ``append``.

Metrics and tracing wrap the store this way, so every backend is instrumented the same
way without knowing about it.
"""

from __future__ import annotations

from collections.abc import Callable

from domain.ports import CommandRecord, Commit, EventStore, RecordedEvent


class EventStoreDecorator:
    def __init__(self, inner: EventStore) -> None:
        self._inner = inner

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        return await self._inner.append(commit)

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        return await self._inner.read_stream(stream_id, after_version)

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        return await self._inner.read_all(after_position, limit)

    async def head_position(self) -> int:
        return await self._inner.head_position()

    async def find_command(self, command_id: str) -> CommandRecord | None:
        return await self._inner.find_command(command_id)

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        self._inner.add_commit_listener(listener)

    async def close(self) -> None:
        await self._inner.close()
