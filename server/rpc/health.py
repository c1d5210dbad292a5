"""The health service: grpcio-health-checking's servicer, with ``List`` answered too.

``grpc.health.v1.Health/List`` (a snapshot of every service's status) is in the
``health.proto`` that grpcio-health-checking 1.85 ships, so reflection lists it and
clients call it, but that package's servicer implements only ``Check`` and ``Watch``.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer


# grpcio-health-checking ships no type hints: its servicer is Any to the type checker.
class GatewayHealthServicer(HealthServicer):  # type: ignore[misc]
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
