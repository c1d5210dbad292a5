"""Thin gRPC servicers: proto request → pydantic command → bus → committed events → stream.

Events are streamed only after ``dispatch`` returns, i.e. after the store made them durable.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from orders.v1 import (
    inventory_command_service_pb2 as inventory_pb2,
)
from orders.v1 import (
    inventory_command_service_pb2_grpc as inventory_grpc,
)
from orders.v1 import (
    order_command_service_pb2 as orders_pb2,
)
from orders.v1 import (
    order_command_service_pb2_grpc as orders_grpc,
)
from pydantic import ValidationError

from domain.bus import CommandBus
from domain.commands import CancelOrder, Command, CreateOrder, RestockProduct
from domain.ports import RecordedEvent
from server.observability.hooks import current_correlation_id, note_command_correlation_id
from server.rpc import mapping
from server.rpc.status_mapping import validation_status
from server.security.identity import current_caller

log = logging.getLogger("order_gateway.rpc")


class CallsInFlight:
    """Counts the command calls being served, each inside ``with calls_in_flight:``."""

    __slots__ = ("_count",)

    def __init__(self) -> None:
        self._count = 0

    def __enter__(self) -> None:
        self._count += 1

    def __exit__(self, *exc_info: object) -> None:
        self._count -= 1

    def none(self) -> bool:
        """Whether no call is being served: what ``StopGate.quiet_only_when`` asks."""
        return self._count == 0

    def alone(self) -> bool:
        """Whether one call at most is being served (from the request to its last
        response): what ``SQLiteEventStore.commit_on_loop_when`` asks."""
        return self._count <= 1


class CommandRunner:
    """Builds the command with the caller's identity and dispatches it.

    An invalid request is answered here (INVALID_ARGUMENT); any other error escapes to
    the last-resort handler (``server.rpc.last_resort``), which maps it to its status.
    """

    def __init__(self, bus: CommandBus) -> None:
        self._bus = bus
        self.in_flight = CallsInFlight()

    async def run(
        self,
        command_type: type[Command],
        data: dict[str, Any],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> list[RecordedEvent]:
        try:
            command = command_type.model_validate(
                {
                    **data,
                    "user_id": current_caller.get().user_id,
                    # Read from the metadata once per call, by the observability interceptor.
                    "correlation_id": current_correlation_id.get(),
                }
            )
        except ValidationError as error:
            await context.abort_with_status(validation_status(error))
        # For the access log: its events' correlation id, which is the server-chosen
        # command id when the request named neither.
        note_command_correlation_id(command.correlation_id or command.command_id)
        return await self._bus.dispatch(command)


class OrderCommandServicer(orders_grpc.OrderCommandServiceServicer):
    def __init__(self, runner: CommandRunner) -> None:
        self._runner = runner

    async def CreateOrder(
        self,
        request: orders_pb2.CreateOrderRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[orders_pb2.CreateOrderResponse]:
        with self._runner.in_flight:
            events = await self._runner.run(
                CreateOrder, mapping.create_order_input(request), context
            )
            for record in events:
                yield mapping.event_response(orders_pb2.CreateOrderResponse, record)

    async def CancelOrder(
        self,
        request: orders_pb2.CancelOrderRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[orders_pb2.CancelOrderResponse]:
        with self._runner.in_flight:
            events = await self._runner.run(
                CancelOrder,
                {**mapping.cancel_order_input(request), "by_admin": current_caller.get().is_admin},
                context,
            )
            for record in events:
                yield mapping.event_response(orders_pb2.CancelOrderResponse, record)


class InventoryCommandServicer(inventory_grpc.InventoryCommandServiceServicer):
    def __init__(self, runner: CommandRunner) -> None:
        self._runner = runner

    async def RestockProduct(
        self,
        request: inventory_pb2.RestockProductRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[inventory_pb2.RestockProductResponse]:
        with self._runner.in_flight:
            events = await self._runner.run(
                RestockProduct, mapping.restock_product_input(request), context
            )
            for record in events:
                yield mapping.event_response(inventory_pb2.RestockProductResponse, record)
