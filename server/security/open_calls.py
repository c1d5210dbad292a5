"""A share of the server's concurrent calls for the open services, which need no token.

grpc refuses calls beyond ``--max-concurrent-streams`` with RESOURCE_EXHAUSTED, whoever
makes them. Health and reflection are open to callers without credentials, and some of
their calls need not end: a health ``Watch`` or a reflection stream stays open as long as
its client keeps it, and any call stays open while its client withholds the request
message. Without a share of their own, a stranger could fill the whole limit with them,
and every authenticated command would be refused. Calls are counted from the moment
they arrive (before grpc reads their request) to the end of their task.
"""

from __future__ import annotations

import asyncio

import grpc

from server.rpc.method_handlers import EarlyCheck, Handler, Metadata, WrappingInterceptor
from server.rpc.status_mapping import plain_status
from server.security.scopes import OPEN_SERVICES

OPEN_SHARE = 10
"""The open services may hold one tenth of the concurrent calls, and at least two."""


def open_call_limit(max_concurrent_calls: int) -> int:
    return max(2, max_concurrent_calls // OPEN_SHARE)


class OpenCallBudget(WrappingInterceptor):
    """Refuses a call to an open service, as it arrives, while ``most`` are in progress."""

    def __init__(self, most: int) -> None:
        self._most = most
        self._in_progress = 0
        self._refusal = plain_status(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"too many health and reflection calls at once (at most {most}), retry later",
        )

    def applies_to(self, method: str, handler: Handler) -> bool:
        return False

    def early_check(self) -> EarlyCheck | None:
        return self._admit

    def _admit(self, method: str, metadata: Metadata) -> grpc.Status | None:
        if not method.startswith(OPEN_SERVICES):
            return None
        task = asyncio.current_task()
        if task is None:
            return None
        if self._in_progress >= self._most:
            return self._refusal
        self._in_progress += 1
        task.add_done_callback(self._ended)
        return None

    def _ended(self, task: asyncio.Task[object]) -> None:
        self._in_progress -= 1
