"""Shared fixtures: a real gateway on 127.0.0.1:0 and stubs connected to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
