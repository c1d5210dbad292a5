"""The floor: a bare grpc.aio server with the gateway's RPC shapes and nothing else.

It serves ``OrderCommandService`` from the generated code alone: each call parses its
request and streams two ready-made events of the gateway's size (``bench.workload``), with
no validation, domain, store or interceptor. ``EventStreamService.Subscribe`` streams
``--subscribe-events`` ready-made events from memory then ends: the floor of catch-up.
What the gateway does beyond this is its own cost.

With ``--durable FILE`` it is the durable floor: each command's two events are first made
durable in a SQLite file by ``bench.durable_log`` (the least a durable store must do), then
streamed. Its distance from the floor is what durability alone costs on the machine.
``--commit-on-loop`` makes the event loop commit each call itself, without the writer
thread: fewer hand-offs for one caller, no group commit for many.

It runs on the event loop the gateway would run on here (uvloop unless
``ORDER_GATEWAY_EVENT_LOOP`` says asyncio), so that the two differ by the gateway's work.

    python -m bench.floor_server --listen 127.0.0.1:PORT [--durable FILE [--commit-on-loop]]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from orders.v1 import (
    event_stream_service_pb2,
    event_stream_service_pb2_grpc,
    order_command_service_pb2,
    order_command_service_pb2_grpc,
)

from bench import workload
from bench.durable_log import DurableLog
from bench.servers import servers_event_loop
from server import event_loop

R = TypeVar("R")

SUBSCRIBE_SAMPLES = 1000
"""Distinct ready-made Subscribe messages, cycled: a realistic mix, cheap to hold."""


class FloorOrders(order_command_service_pb2_grpc.OrderCommandServiceServicer):
    def __init__(self) -> None:
        self._created = [
            order_command_service_pb2.CreateOrderResponse(event=event)
            for event in workload.sample_create_events()
        ]
        self._cancelled = [
            order_command_service_pb2.CancelOrderResponse(event=event)
            for event in workload.sample_cancel_events()
        ]

    async def CreateOrder(
        self,
        request: order_command_service_pb2.CreateOrderRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[order_command_service_pb2.CreateOrderResponse]:
        for response in self._created:
            yield response

    async def CancelOrder(
        self,
        request: order_command_service_pb2.CancelOrderRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[order_command_service_pb2.CancelOrderResponse]:
        for response in self._cancelled:
            yield response


class DurableFloorOrders(FloorOrders):
    """The floor's answers, each after its two events are durable in a ``DurableLog``.

    Every command writes a new stream (versions 1 and 2), so appends never collide and
    nothing is read: the store work a gateway cannot do without, and no more.
    """

    def __init__(self, log: DurableLog) -> None:
        super().__init__()
        self._log = log
        self._streams = itertools.count()
        self._created_data = [r.event.SerializeToString() for r in self._created]
        self._cancelled_data = [r.event.SerializeToString() for r in self._cancelled]

    async def _after_commit(self, data: list[bytes], responses: list[R]) -> AsyncIterator[R]:
        """``responses``, once one new stream of ``data`` events is durable."""
        stream = f"order-{next(self._streams)}"
        await self._log.append([(stream, n, event) for n, event in enumerate(data, start=1)])
        for response in responses:
            yield response

    # grpc.aio serves a stream from an async generator function: these must be ones too.
    async def CreateOrder(
        self,
        request: order_command_service_pb2.CreateOrderRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[order_command_service_pb2.CreateOrderResponse]:
        async for response in self._after_commit(self._created_data, self._created):
            yield response

    async def CancelOrder(
        self,
        request: order_command_service_pb2.CancelOrderRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[order_command_service_pb2.CancelOrderResponse]:
        async for response in self._after_commit(self._cancelled_data, self._cancelled):
            yield response


class FloorEvents(event_stream_service_pb2_grpc.EventStreamServiceServicer):
    """Streams ``total`` events already built in memory, with increasing positions."""

    def __init__(self, total: int) -> None:
        self._total = total
        samples: list[event_stream_service_pb2.SubscribeResponse] = []
        while len(samples) < SUBSCRIBE_SAMPLES:
            # Positions as in a million-event store, so the messages are as long.
            for event in workload.sample_create_events(position=500_000 + len(samples)):
                samples.append(event_stream_service_pb2.SubscribeResponse(event=event))
        self._samples = samples

    async def Subscribe(
        self,
        request: event_stream_service_pb2.SubscribeRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[event_stream_service_pb2.SubscribeResponse]:
        samples = self._samples
        for n in range(self._total):
            yield samples[n % len(samples)]


async def serve(
    listen: str, subscribe_events: int, durable: Path | None, commit_on_loop: bool
) -> None:
    server = grpc.aio.server()
    loop = asyncio.get_running_loop()
    log = None if durable is None else DurableLog(durable, loop, on_loop=commit_on_loop)
    orders = FloorOrders() if log is None else DurableFloorOrders(log)
    order_command_service_pb2_grpc.add_OrderCommandServiceServicer_to_server(orders, server)
    event_stream_service_pb2_grpc.add_EventStreamServiceServicer_to_server(
        FloorEvents(subscribe_events), server
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(listen)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)
    if log is not None:
        log.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_server", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:50151", metavar="HOST:PORT")
    parser.add_argument("--subscribe-events", type=int, default=1_000_000, metavar="N")
    parser.add_argument(
        "--durable", type=Path, metavar="FILE", help="SQLite file: serve as the durable floor"
    )
    parser.add_argument(
        "--commit-on-loop",
        action="store_true",
        help="with --durable: commit on the event loop, not in a writer thread",
    )
    parser.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default=servers_event_loop(),
        help="the event loop to run on (default: the gateway's, ORDER_GATEWAY_EVENT_LOOP or "
        "uvloop)",
    )
    args = parser.parse_args(argv)
    if args.commit_on_loop and args.durable is None:
        parser.error("--commit-on-loop needs --durable")
    event_loop.run(
        serve(args.listen, args.subscribe_events, args.durable, args.commit_on_loop),
        args.event_loop,
    )


if __name__ == "__main__":
    main()
