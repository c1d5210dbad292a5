"""Helpers for consumer-group tests: a gateway with quick group timings, and members."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc

from domain.ports import EventStore
from server.app import Gateway, create_server
from server.config import Settings
from server.consumer_groups.engine import GroupTuning
from server.stores.memory import MemoryEventStore

QUICK = GroupTuning(flush_interval=0.05, retry_base=0.02)
"""Checkpoints stored often and retries quick, so that tests do not wait on them."""


@contextlib.asynccontextmanager
async def group_gateway(
    store: EventStore | None = None, tuning: GroupTuning = QUICK, **settings: Any
) -> AsyncIterator[Gateway]:
    gateway = await create_server(
        Settings(listen="127.0.0.1:0", store="memory://", **settings),
        store=store if store is not None else MemoryEventStore(),
        group_tuning=tuning,
    )
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


def group_settings(
    partitions: int = 0,
    ack_timeout: float | None = None,
    max_deliveries: int = 0,
    event_types: Sequence[str] = (),
    **more: Any,
) -> pb.ConsumerGroupSettings:
    settings = pb.ConsumerGroupSettings(
        partitions=partitions, max_deliveries=max_deliveries, event_types=event_types, **more
    )
    if ack_timeout is not None:
        duration = duration_pb2.Duration()
        duration.FromNanoseconds(int(ack_timeout * 1e9))
        settings.ack_timeout.CopyFrom(duration)
    return settings


@dataclass
class Member:
    """One Consume stream: what it received, and how to answer."""

    call: Any
    inbox: asyncio.Queue[pb.ConsumeResponse] = field(default_factory=asyncio.Queue)
    assignments: list[pb.Assignment] = field(default_factory=list)
    error: grpc.aio.AioRpcError | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    @property
    def partitions(self) -> list[int]:
        return list(self.assignments[-1].partitions) if self.assignments else []

    @property
    def member_id(self) -> str:
        return self.assignments[0].member_id

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.call:
                if message.WhichOneof("message") == "assignment":
                    self.assignments.append(message.assignment)
                await self.inbox.put(message)
        except grpc.aio.AioRpcError as error:
            self.error = error
        finally:
            self.ended.set()

    async def delivery(self, within: float = 10) -> pb.Delivery:
        """The next delivery (assignments on the way are recorded and passed over)."""
        async with asyncio.timeout(within):
            while True:
                message = await self.inbox.get()
                if message.WhichOneof("message") == "delivery":
                    return message.delivery

    async def deliveries(self, count: int, within: float = 10) -> list[pb.Delivery]:
        return [await self.delivery(within) for _ in range(count)]

    async def no_delivery(self, within: float) -> None:
        with contextlib.suppress(TimeoutError):
            delivery = await self.delivery(within)
            raise AssertionError(f"unexpected delivery {delivery}")

    async def assignment(self, within: float = 10) -> pb.Assignment:
        async with asyncio.timeout(within):
            while True:
                message = await self.inbox.get()
                if message.WhichOneof("message") == "assignment":
                    return message.assignment

    async def send(self, request: pb.ConsumeRequest) -> None:
        await self.call.write(request)

    async def ack(self, *event_ids: str) -> None:
        await self.send(pb.ConsumeRequest(ack=pb.Ack(event_ids=event_ids)))

    async def nack(self, *event_ids: str, action: int = 0, reason: str = "") -> None:
        nack = pb.Nack(event_ids=event_ids, reason=reason)
        nack.action = action  # type: ignore[assignment]  # also values no enum names
        await self.send(pb.ConsumeRequest(nack=nack))

    async def extend(self, *event_ids: str) -> None:
        await self.send(pb.ConsumeRequest(extend=pb.Extend(event_ids=event_ids)))

    async def finished(self, within: float = 10) -> grpc.aio.AioRpcError | None:
        async with asyncio.timeout(within):
            await self.ended.wait()
        return self.error

    async def close(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


@contextlib.asynccontextmanager
async def member(
    stub: pb_grpc.ConsumerGroupServiceAsyncStub,
    group: str,
    member_id: str = "",
    max_in_flight: int = 0,
    metadata: Any = None,
) -> AsyncIterator[Member]:
    """A joined member, its first Assignment received."""
    joined = await join(stub, group, member_id, max_in_flight, metadata)
    try:
        yield joined
    finally:
        await joined.close()


async def join(
    stub: pb_grpc.ConsumerGroupServiceAsyncStub,
    group: str,
    member_id: str = "",
    max_in_flight: int = 0,
    metadata: Any = None,
) -> Member:
    call = stub.Consume(metadata=metadata)
    await call.write(
        pb.ConsumeRequest(
            join=pb.Join(group=group, member_id=member_id, max_in_flight=max_in_flight)
        )
    )
    joined = Member(call)
    joined.start()
    async with asyncio.timeout(10):
        while not joined.assignments:
            if joined.ended.is_set():
                assert joined.error is not None
                raise joined.error
            await asyncio.sleep(0.01)
    return joined


def assert_never_two_at_once(
    deliveries: Sequence[tuple[float, str, int, str]], partitions: int
) -> None:
    """``deliveries``: (time, member, partition, event id) as the members received them.
    Per partition, each member's deliveries form one stretch of time, and the stretches
    of different members do not overlap."""
    for partition in range(partitions):
        stretches: dict[str, tuple[float, float]] = {}
        for at, name, delivered_partition, _ in deliveries:
            if delivered_partition == partition:
                first, last = stretches.get(name, (at, at))
                stretches[name] = (min(first, at), max(last, at))
        ordered = sorted(stretches.values())
        for (_, end), (start, _) in itertools.pairwise(ordered):
            assert end < start, f"partition {partition} delivered by two members at once"
