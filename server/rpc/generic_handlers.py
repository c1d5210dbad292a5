"""``GenericHandlersOnly``: services added to a grpc.aio server by their generic handlers.

The ``add_*_to_server`` functions ``grpc_tools.protoc`` generates (grpcio-reflection's and
grpcio-health-checking's too) register each service twice: as a generic handler, as
every grpc release has, and method by method as "registered methods" (grpcio 1.63+),
which take precedence. Counted under callgrind on grpcio 1.85, with the gateway's
services registered that way every call cost about 79,000 more instructions (CreateOrder
on SQLite: 1,776,000 against 1,697,000 per call; a server answering with ready-made
responses, without interceptors: 744,000 against 689,000). The generic handlers serve the
same methods with the same handlers, so the gateway adds its services through this
stand-in, which keeps them and leaves the registered methods out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import grpc


class GenericHandlersOnly:
    """What the generated ``add_*_to_server`` functions use of a server."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Any]
    ) -> None:
        """Left out: the generic handler added beside them serves these methods."""

    def as_server(self) -> grpc.aio.Server:
        """This stand-in where the generated functions' signatures want a server."""
        return cast(grpc.aio.Server, self)
