"""Server reflection, as grpcurl and ``buf curl`` use it: every service, message and method
of the API is found by its full name, and the file that declares it comes back."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.clients import Clients

SERVICES = (
    "orders.v1.OrderCommandService",
    "orders.v1.InventoryCommandService",
    "orders.v1.EventStreamService",
    "orders.v1.ConsumerGroupService",
    "grpc.health.v1.Health",
)


async def ask(clients: Clients, symbol: str) -> reflection_pb2.ServerReflectionResponse:
    call = reflection_pb2_grpc.ServerReflectionStub(clients.channel).ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
    answer: reflection_pb2.ServerReflectionResponse = await call.read()
    await call.done_writing()
    return answer


def declared(answer: reflection_pb2.ServerReflectionResponse) -> dict[str, list[str]]:
    """Each service the answer's first file declares, with its methods."""
    first = answer.file_descriptor_response.file_descriptor_proto[0]
    file = descriptor_pb2.FileDescriptorProto.FromString(first)
    return {
        f"{file.package}.{service.name}": [method.name for method in service.method]
        for service in file.service
    }


async def test_every_method_is_found_in_its_service_s_file(clients: Clients) -> None:
    for service in SERVICES:
        methods = declared(await ask(clients, service))[service]
        assert methods
        for method in methods:
            # grpcurl describe orders.v1.OrderCommandService.CreateOrder asks this.
            answer = await ask(clients, f"{service}.{method}")
            assert answer.WhichOneof("message_response") == "file_descriptor_response", method
            assert method in declared(answer)[service]


@pytest.mark.parametrize(
    "symbol",
    [
        "orders.v1.OrderCommandService.PlaceOrder",
        "orders.v1.NoSuchService.CreateOrder",
        "CreateOrder",
        "orders.v1.CreateOrderRequest.NoSuchField",
    ],
)
async def test_an_unknown_symbol_is_not_found(clients: Clients, symbol: str) -> None:
    answer = await ask(clients, symbol)
    assert answer.WhichOneof("message_response") == "error_response"
    assert answer.error_response.error_code == 5  # NOT_FOUND


async def test_messages_and_fields_are_found_as_before(clients: Clients) -> None:
    for symbol in ("orders.v1.CreateOrderRequest", "orders.v1.CreateOrderRequest.items"):
        answer = await ask(clients, symbol)
        assert answer.WhichOneof("message_response") == "file_descriptor_response", symbol
