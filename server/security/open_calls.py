"""A share of the server's concurrent calls for the open services, which need no token.

grpc refuses calls beyond ``--max-concurrent-streams`` with RESOURCE_EXHAUSTED, whoever
makes them. Health and reflection are open to callers without credentials, and some of
their calls need not end: a health ``Watch`` or a reflection stream stays open as long as
its client keeps it, and any call stays open while its client withholds the request
message. Without a share of their own, a stranger could fill the whole limit with them,
and every authenticated command would be refused. Calls are counted from the moment
they arrive (before grpc reads their request) to the end of their task.

Health and reflection have a share each: grpcurl and ``buf curl`` keep a reflection
stream open for the whole of the call they make (a ``Subscribe`` followed for an hour),
and with one share for both, as many such sessions made every health probe fail, the
replica looking down to its orchestrator.
"""

from __future__ import annotations

import asyncio

import grpc

from server.rpc.method_handlers import EarlyCheck, Handler, Metadata, WrappingInterceptor
from server.rpc.status_mapping import plain_status
from server.security.scopes import OPEN_SERVICES

OPEN_SHARE = 10
"""Health may hold one tenth of the concurrent calls, and reflection another, each at
least two."""

HEALTH_SERVICE = "/grpc.health.v1.Health/"


def open_call_limit(max_concurrent_calls: int) -> int:
    return max(2, max_concurrent_calls // OPEN_SHARE)


class OpenCallBudget(WrappingInterceptor):
    """Refuses a call to an open service, as it arrives, while ``most`` calls to that
    service (health, or reflection in either version) are in progress."""

    def __init__(self, most: int) -> None:
        self._health = _Share("health", most)
        self._reflection = _Share("reflection", most)

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
        share = self._health if method.startswith(HEALTH_SERVICE) else self._reflection
        return share.admit(task)


class _Share:
    """The calls in progress to one open service, at most ``most``."""

    def __init__(self, service: str, most: int) -> None:
        self._most = most
        self._in_progress = 0
        self._refusal = plain_status(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"too many {service} calls at once (at most {most}), retry later",
        )

    def admit(self, task: asyncio.Task[object]) -> grpc.Status | None:
        if self._in_progress >= self._most:
            return self._refusal
        self._in_progress += 1
        task.add_done_callback(self._ended)
        return None

    def _ended(self, task: asyncio.Task[object]) -> None:
        self._in_progress -= 1
