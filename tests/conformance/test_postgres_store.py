"""The conformance suite against PostgreSQL, one fresh database per test."""

from __future__ import annotations

import pytest

from tests.conformance.contract import EventStoreContract

pytestmark = pytest.mark.postgres


class TestPostgresEventStore(EventStoreContract):
    supports_processes = True
    # A psycopg async pool belongs to the event loop that opened it: each thread in the
    # thread test opens its own store (its own pool) on the same database instead.
    shares_across_threads = False

    @pytest.fixture
    def store_url(self, fresh_postgres_url: str) -> str:
        return fresh_postgres_url
