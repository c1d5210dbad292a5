"""The conformance suite against the in-memory reference store."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from domain.ports import EventStore
from server.stores.memory import MemoryEventStore
from tests.conformance.contract import EventStoreContract


class TestMemoryEventStore(EventStoreContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[EventStore]:
        opened = MemoryEventStore()
        yield opened
        await opened.close()

    @pytest.fixture
    def store_url(self) -> str:
        pytest.skip("the memory store lives in one process and has no URL")
