"""The descriptor pool server reflection answers from, where methods can be looked up.

protobuf's default pool (upb) finds a file by the full name of a service, a message or a
field, but not of a method: ``grpcurl describe orders.v1.OrderCommandService.CreateOrder``
answered "Symbol not found", as did ``grpc.health.v1.Health.Check``. A method is declared
in its service's file, which is the answer reflection owes for it.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor


class MethodFindingPool:
    """``pool`` (default: protobuf's default pool), methods included in
    ``FindFileContainingSymbol``; everything else is the pool's own."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                service = None
            if service is None or method not in service.methods_by_name:
                raise
            return service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)
