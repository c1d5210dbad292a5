"""Wrapped gRPC method handlers, built once per method and reused for every call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import grpc

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class WrappedHandlers:
    """Per method, ``wrap(handler, method)`` of the handler grpc found for it.

    An interceptor's wrapper holds no per-call state (each call reads its own metadata),
    so it is built on the first call and reused: building handlers on every call was a
    third of the interceptor stack's time. A different handler for the method (a servicer
    registered again) gets a new wrapper.
    """

    def __init__(self, wrap: Callable[[Handler, str], Handler]) -> None:
        self._wrap = wrap
        self._by_method: dict[str, tuple[Handler, Handler]] = {}

    def get(self, handler: Handler, method: str) -> Handler:
        cached = self._by_method.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(handler, method))
            self._by_method[method] = cached
        return cached[1]
