"""Gateways for the observability tests: started, connected, stopped."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from orders.v1 import (
    event_stream_service_pb2_grpc,
    inventory_command_service_pb2_grpc,
    order_command_service_pb2_grpc,
)

from domain.ports import Commit, EventStore, RecordedEvent
from server.app import Gateway, create_server
from server.config import Settings
from server.security.auth import TokenFileAuthenticator
from server.security.identity import Caller
from server.stores.memory import MemoryEventStore
from tests.clients import Clients

TOKEN = "s3cret-bearer-token-never-logged"
USER = "checkout-service"
ALL_SCOPES = frozenset({"orders:write", "inventory:write", "events:read"})


def token_authenticator() -> TokenFileAuthenticator:
    return TokenFileAuthenticator(
        {hashlib.sha256(TOKEN.encode()).digest(): Caller(USER, ALL_SCOPES)}
    )


class FrozenStore(MemoryEventStore):
    """Stands in for a PostgreSQL that stopped answering: an append never returns, and
    once cancelled it carries on, as psycopg does (it asks the server to cancel the
    query, and waits for that) until ``thawed`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.appending: list[Commit] = []
        self.thawed = asyncio.Event()
        self.ended = 0

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        self.appending.append(commit)
        try:
            await asyncio.Event().wait()
        finally:
            await self.thawed.wait()
            self.ended += 1
        raise AssertionError("unreachable")


@asynccontextmanager
async def running(
    store: EventStore | None = None, secured: bool = False, **settings: Any
) -> AsyncIterator[tuple[Gateway, Clients]]:
    """A started gateway on 127.0.0.1:0 (memory store) and clients connected to it."""
    tracing = settings.pop("tracing", None)
    gateway = await create_server(
        Settings(listen="127.0.0.1:0", store="memory://", **settings),
        store=store or MemoryEventStore(),
        authenticators=[token_authenticator()] if secured else (),
        tracing=tracing,
    )
    await gateway.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            yield (
                gateway,
                Clients(
                    channel=channel,
                    orders=order_command_service_pb2_grpc.OrderCommandServiceStub(channel),
                    inventory=inventory_command_service_pb2_grpc.InventoryCommandServiceStub(
                        channel
                    ),
                    events=event_stream_service_pb2_grpc.EventStreamServiceStub(channel),
                ),
            )
    finally:
        await gateway.stop()


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    """The error an awaitable call ends with (fails the test if it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call succeeded")
