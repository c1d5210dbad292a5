"""The health service: grpcio-health-checking's servicer, with ``List`` answered too,
and ``Watch`` streams that end when the gateway stops.

``grpc.health.v1.Health/List`` (a snapshot of every service's status) is in the
``health.proto`` that grpcio-health-checking 1.85 ships, so reflection lists it and
clients call it, but that package's servicer implements only ``Check`` and ``Watch``.

That servicer's ``Watch`` never ends: a stop would wait for every open one until its
grace period ran out (5 s by default), then cancel it. ``end_watches`` ends them, with
UNAVAILABLE, once their NOT_SERVING has gone out.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer


# grpcio-health-checking ships no type hints: its servicer is Any to the type checker.
class GatewayHealthServicer(HealthServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self._watches_ended = asyncio.Event()

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        watching = asyncio.ensure_future(super().Watch(request, context))
        ended = asyncio.ensure_future(self._watches_ended.wait())
        try:
            await asyncio.wait((watching, ended), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            ended.cancel()
            await asyncio.gather(watching, ended, return_exceptions=True)
        if self._watches_ended.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    def end_watches(self) -> None:
        """End every ``Watch`` stream, and any that opens from now on."""
        self._watches_ended.set()

    async def List(
        self,
        request: health_pb2.HealthListRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> health_pb2.HealthListResponse:
        # The statuses that ``set`` and ``enter_graceful_shutdown`` keep: what ``Check``
        # answers for each service, the overall one ("") included.
        return health_pb2.HealthListResponse(
            statuses={
                service: health_pb2.HealthCheckResponse(status=status)
                for service, status in self._server_status.items()
            }
        )
