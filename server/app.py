"""Builds the gRPC server (``create_server``) and runs it until a signal (``serve``)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from orders.v1 import (
    event_stream_service_pb2,
    inventory_command_service_pb2,
    inventory_command_service_pb2_grpc,
    order_command_service_pb2,
    order_command_service_pb2_grpc,
)

from domain.ports import EventStore
from server.auth import Authenticator, AuthInterceptor
from server.bootstrap import bootstrap
from server.config import Settings
from server.decoding import RequestDecodingInterceptor
from server.servicers import CommandRunner, InventoryCommandServicer, OrderCommandServicer
from server.stores.factory import open_store

log = logging.getLogger("order_gateway.server")

SERVICE_NAMES = (
    order_command_service_pb2.DESCRIPTOR.services_by_name["OrderCommandService"].full_name,
    inventory_command_service_pb2.DESCRIPTOR.services_by_name["InventoryCommandService"].full_name,
    event_stream_service_pb2.DESCRIPTOR.services_by_name["EventStreamService"].full_name,
)


@dataclass
class Gateway:
    """A started-or-not gateway: the grpc server, its port, and what must be closed with it."""

    server: grpc.aio.Server
    port: int
    store: EventStore
    health: HealthServicer
    shutdown_grace: float
    _stopped: bool = field(default=False, init=False)

    async def start(self) -> None:
        await self.server.start()
        for name in (*SERVICE_NAMES, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        """Graceful stop: NOT_SERVING first, refuse new calls, let in-flight ones finish."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.shutdown_grace)
        await self.store.close()


def server_options(settings: Settings) -> Sequence[tuple[str, int]]:
    return (
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # Accept client keepalive pings down to every 10 s, even without calls in flight.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    )


async def create_server(
    settings: Settings,
    store: EventStore | None = None,
    authenticators: Sequence[Authenticator] = (),
) -> Gateway:
    """A configured, bound, not yet started gateway (``--listen`` may use port 0)."""
    store = store if store is not None else await open_store(settings.store)
    server = grpc.aio.server(
        # Authentication runs first: its verdict precedes any look at the request.
        interceptors=[AuthInterceptor(authenticators), RequestDecodingInterceptor()],
        options=server_options(settings),
    )
    runner = CommandRunner(bootstrap(store))
    order_command_service_pb2_grpc.add_OrderCommandServiceServicer_to_server(
        OrderCommandServicer(runner), server
    )
    inventory_command_service_pb2_grpc.add_InventoryCommandServiceServicer_to_server(
        InventoryCommandServicer(runner), server
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(settings.listen)
    return Gateway(server, port, store, health, settings.shutdown_grace)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    gateway = await create_server(settings)
    await gateway.start()
    log.info("order-gateway listening on %s (store %s)", settings.listen, settings.store)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down")
    await gateway.stop()
