"""Helpers for the Subscribe tests: gateways with chosen tuning, writers, stream readers."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from orders.v1 import (
    event_stream_service_pb2,
    event_stream_service_pb2_grpc,
    events_pb2,
    inventory_command_service_pb2_grpc,
    order_command_service_pb2_grpc,
)

from domain.ports import CommandRecord, Commit, EventStore, RecordedEvent
from server.app import Gateway, create_server
from server.config import Settings
from server.rpc.subscription_hub import HubTuning
from server.stores.memory import MemoryEventStore
from tests.clients import Clients, item, order_request

WAIT = 30.0
"""Upper bound for any single wait in these tests: a bug fails, it never hangs."""

SMALL_WINDOW = (("grpc.http2.bdp_probe", 0),)
"""Channel options for a client that must not absorb the server's output: without them
the client's HTTP/2 window grows until it buffers megabytes that a test never reads."""


class WrappedStore:
    """A memory store behind a wrapper, for tests to override one behaviour."""

    def __init__(self) -> None:
        self.inner = MemoryEventStore()

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        return await self.inner.append(commit)

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        return await self.inner.read_stream(stream_id, after_version)

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        return await self.inner.read_all(after_position, limit)

    async def head_position(self) -> int:
        return await self.inner.head_position()

    async def find_command(self, command_id: str) -> CommandRecord | None:
        return await self.inner.find_command(command_id)

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        self.inner.add_commit_listener(listener)

    async def close(self) -> None:
        await self.inner.close()


class CountingStore(WrappedStore):
    """Counts ``read_all`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        self.reads += 1
        return await super().read_all(after_position, limit)


class JitteryStore(WrappedStore):
    """Appends and reads that take a random while, like a real database's: the hub and
    catching-up subscriptions then overtake each other in every order."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self._random = random.Random(seed)

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        await asyncio.sleep(self._random.uniform(0, 0.002))
        return await super().append(commit)

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        await asyncio.sleep(self._random.uniform(0, 0.003))
        page = await super().read_all(after_position, limit)
        await asyncio.sleep(self._random.uniform(0, 0.003))
        return page


@contextlib.asynccontextmanager
async def running_gateway(
    store: EventStore | None = None,
    tuning: HubTuning | None = None,
    **settings: Any,
) -> AsyncIterator[Gateway]:
    gateway = await create_server(
        Settings(listen="127.0.0.1:0", store="memory://", **settings),
        store=store if store is not None else MemoryEventStore(),
        hub_tuning=tuning,
    )
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


@contextlib.asynccontextmanager
async def connect(
    gateway: Gateway, options: Sequence[tuple[str, Any]] = ()
) -> AsyncIterator[Clients]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}", options) as channel:
        yield clients_on(channel)


def clients_on(channel: grpc.aio.Channel) -> Clients:
    return Clients(
        channel=channel,
        orders=order_command_service_pb2_grpc.OrderCommandServiceStub(channel),
        inventory=inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel),
        events=event_stream_service_pb2_grpc.EventStreamServiceStub(channel),
    )


async def write_orders(clients: Clients, product_id: str, orders: int) -> None:
    """Restock ``product_id``, then place ``orders`` one-item orders: 1 + 2·orders events."""
    await clients.restock(product_id, orders)
    for _ in range(orders):
        await clients.create(order_request(item(product_id)))


async def run_writers(clients: Clients, writers: int, orders: int, prefix: str = "w") -> None:
    """``writers`` concurrent writers on products of their own (no conflicts)."""
    async with asyncio.TaskGroup() as group:
        for n in range(writers):
            group.create_task(write_orders(clients, f"{prefix}-{n}", orders))


SubscribeResponse = event_stream_service_pb2.SubscribeResponse
SubscribeCall = grpc.aio.UnaryStreamCall[
    event_stream_service_pb2.SubscribeRequest, event_stream_service_pb2.SubscribeResponse
]


async def until(condition: Callable[[], bool]) -> None:
    """Wait, bounded, for state that grpc's own tasks change (e.g. a cancel reaching the server)."""
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110 - no event to wait on: grpc owns the state
            await asyncio.sleep(0.01)


class StreamReader:
    """Reads one Subscribe call, keeping events and checkpoints apart."""

    def __init__(self, call: SubscribeCall) -> None:
        self.call = call
        self.events: list[events_pb2.Event] = []
        self.checkpoints: list[int] = []

    @classmethod
    def open(cls, clients: Clients, **request: Any) -> StreamReader:
        return cls(clients.events.Subscribe(event_stream_service_pb2.SubscribeRequest(**request)))

    async def next(self) -> event_stream_service_pb2.SubscribeResponse:
        async with asyncio.timeout(WAIT):
            response = await self.call.read()
        assert isinstance(response, SubscribeResponse), "the stream ended"
        self._record(response)
        return response

    def _record(self, response: event_stream_service_pb2.SubscribeResponse) -> None:
        if response.HasField("event"):
            self.events.append(response.event)
        else:
            self.checkpoints.append(response.checkpoint.position)

    async def next_checkpoint(self) -> int:
        # Bounded as a whole too: events could keep coming without a checkpoint.
        async with asyncio.timeout(WAIT):
            while not (await self.next()).HasField("checkpoint"):
                pass
        return self.checkpoints[-1]

    async def through(self, position: int) -> list[events_pb2.Event]:
        """Read until an event or a checkpoint at or beyond ``position``; all events so far."""
        # Bounded as a whole too: checkpoints that never advance would keep it reading.
        async with asyncio.timeout(WAIT):
            while self.progress() < position:
                await self.next()
        return self.events

    def progress(self) -> int:
        last_event = self.events[-1].position if self.events else 0
        last_checkpoint = self.checkpoints[-1] if self.checkpoints else 0
        return max(last_event, last_checkpoint)

    async def status(self) -> grpc.StatusCode:
        """Read (and keep) the rest of the stream; its status code."""
        try:
            async with asyncio.timeout(WAIT):
                # read() answers grpc.aio.EOF at the end of the stream.
                while isinstance(response := await self.call.read(), SubscribeResponse):
                    self._record(response)
        except grpc.aio.AioRpcError as error:
            return error.code()
        code: grpc.StatusCode = await self.call.code()
        return code


def identities(events: list[events_pb2.Event]) -> list[tuple[int, str]]:
    return [(event.position, event.event_id) for event in events]


async def stored(store: EventStore) -> list[tuple[int, str]]:
    """Every committed event's (position, event_id), read fresh from the store."""
    found: list[tuple[int, str]] = []
    while page := await store.read_all(found[-1][0] if found else 0, 1000):
        found.extend((record.position, record.event_id) for record in page)
    return found
