"""Shared fixtures: a real gateway on 127.0.0.1:0 and stubs connected to it."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from orders.v1 import (
    event_stream_service_pb2_grpc,
    inventory_command_service_pb2_grpc,
    order_command_service_pb2_grpc,
)

from server.app import Gateway, create_server
from server.config import Settings
from server.stores.memory import MemoryEventStore
from tests.clients import Clients
from tests.postgres_databases import new_database


@pytest.fixture
def keep_root_logger() -> Iterator[None]:
    """For tests calling ``server.cli.main``, which configures the root logger for the
    process: other tests must not inherit that."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    started = await create_server(
        Settings(listen="127.0.0.1:0", store="memory://"), store=MemoryEventStore()
    )
    await started.start()
    yield started
    await started.stop()


@pytest.fixture
async def clients(gateway: Gateway) -> AsyncIterator[Clients]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        yield Clients(
            channel=channel,
            orders=order_command_service_pb2_grpc.OrderCommandServiceStub(channel),
            inventory=inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel),
            events=event_stream_service_pb2_grpc.EventStreamServiceStub(channel),
        )


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test PostgreSQL server (scripts/test starts one and sets the variable).

    Without it, PostgreSQL tests are skipped, unless ORDER_GATEWAY_REQUIRE_POSTGRES=1
    (as in scripts/test and CI), where a missing server fails them instead.
    """
    url = os.environ.get("ORDER_GATEWAY_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("ORDER_GATEWAY_REQUIRE_POSTGRES") == "1":
            pytest.fail("ORDER_GATEWAY_TEST_POSTGRES_URL is not set")
        pytest.skip("no PostgreSQL: set ORDER_GATEWAY_TEST_POSTGRES_URL (scripts/test does)")
    return url


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """A URL to a new, empty database on the test server, dropped after the test."""
    with new_database(postgres_url) as url:
        yield url
