"""Which scope each RPC needs, checked against the RPCs the protos declare.

The gateway fails closed: every ``orders.v1`` method must have its scopes here. The
server refuses to start if one has none (``check_every_method_scoped``), and the auth
interceptor refuses a call to any method that has none, except the open services below.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

from domain.errors import ConfigurationError
from server.security.identity import (
    SCOPE_EVENTS_ADMIN,
    SCOPE_EVENTS_READ,
    SCOPE_INVENTORY_WRITE,
    SCOPE_ORDERS_ADMIN,
    SCOPE_ORDERS_WRITE,
)

OWN_PACKAGE = "orders.v1"

OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""Method prefixes that need no token: probes and tools must work without one."""

REQUIRED_SCOPES: dict[str, frozenset[str]] = {
    "/orders.v1.OrderCommandService/CreateOrder": frozenset({SCOPE_ORDERS_WRITE}),
    # orders:admin alone is enough to cancel any order.
    "/orders.v1.OrderCommandService/CancelOrder": frozenset(
        {SCOPE_ORDERS_WRITE, SCOPE_ORDERS_ADMIN}
    ),
    "/orders.v1.InventoryCommandService/RestockProduct": frozenset({SCOPE_INVENTORY_WRITE}),
    "/orders.v1.EventStreamService/Subscribe": frozenset({SCOPE_EVENTS_READ}),
    "/orders.v1.ConsumerGroupService/Consume": frozenset({SCOPE_EVENTS_READ}),
    "/orders.v1.ConsumerGroupService/GetConsumerGroup": frozenset({SCOPE_EVENTS_READ}),
    "/orders.v1.ConsumerGroupService/ListConsumerGroups": frozenset({SCOPE_EVENTS_READ}),
    "/orders.v1.ConsumerGroupService/CreateConsumerGroup": frozenset({SCOPE_EVENTS_ADMIN}),
    "/orders.v1.ConsumerGroupService/DeleteConsumerGroup": frozenset({SCOPE_EVENTS_ADMIN}),
    "/orders.v1.ConsumerGroupService/ReplayParked": frozenset({SCOPE_EVENTS_ADMIN}),
}
"""Per method, the scopes of which the caller needs at least one."""

COMMANDS = frozenset(
    {
        "/orders.v1.OrderCommandService/CreateOrder",
        "/orders.v1.OrderCommandService/CancelOrder",
        "/orders.v1.InventoryCommandService/RestockProduct",
    }
)
"""The methods that commit: their credentials are checked once, as the call arrives, and
the call runs to its answer. Every other streaming method ends when its caller's
credentials expire (``server.security.auth``)."""


class UnscopedMethodsError(ConfigurationError):
    """Methods the protos declare have no scope: serving them would leave them open."""

    def __init__(self, methods: Iterable[str]) -> None:
        self.methods = sorted(methods)
        super().__init__(
            "refusing to serve methods that have no scope assigned: " + ", ".join(self.methods)
        )


def own_methods() -> list[str]:
    """Every method of every ``orders.v1`` service, ``/orders.v1.Service/Method``, read
    from the generated descriptors (all of the package's proto files, served or not)."""
    package = importlib.import_module(OWN_PACKAGE)
    methods: list[str] = []
    for module_info in pkgutil.iter_modules(package.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{OWN_PACKAGE}.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            methods.extend(f"/{service.full_name}/{method.name}" for method in service.methods)
    return sorted(methods)


def unscoped(methods: Iterable[str]) -> list[str]:
    return [method for method in methods if method not in REQUIRED_SCOPES]


def check_every_method_scoped() -> None:
    """Raise ``UnscopedMethodsError`` if an ``orders.v1`` method has no scope."""
    missing = unscoped(own_methods())
    if missing:
        raise UnscopedMethodsError(missing)
