"""The access log: one line per RPC, readable as text or as JSON fields.

Only what ``RpcOutcome`` carries is logged: never metadata as a whole, so bearer tokens
(and any other credential a client sends) cannot reach the log.
"""

from __future__ import annotations

import logging

import grpc

from server.observability import RpcOutcome

log = logging.getLogger("order_gateway.access")

QUIET_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")
"""Logged at DEBUG: health probes arrive every few seconds and would drown the log."""

SERVER_FAULTS = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
)
"""Logged at WARNING: the server's fault, not the client's."""


class AccessLog:
    def rpc_finished(self, outcome: RpcOutcome) -> None:
        level = self._level(outcome)
        if not log.isEnabledFor(level):
            return
        duration_ms = round(outcome.duration * 1e3, 3)
        log.log(
            level,
            "%s %s %.1f ms request_id=%s correlation_id=%s user=%s peer=%s",
            outcome.method,
            outcome.code.name,
            duration_ms,
            outcome.request_id,
            outcome.correlation_id or "-",
            outcome.user_id or "-",
            outcome.peer,
            extra={
                "fields": {
                    "method": outcome.method,
                    "code": outcome.code.name,
                    "duration_ms": duration_ms,
                    "request_id": outcome.request_id,
                    "correlation_id": outcome.correlation_id,
                    "user_id": outcome.user_id,
                    "peer": outcome.peer,
                    **({"trace_id": outcome.trace_id} if outcome.trace_id else {}),
                }
            },
        )

    @staticmethod
    def _level(outcome: RpcOutcome) -> int:
        if outcome.code in SERVER_FAULTS:
            return logging.WARNING
        if outcome.service.startswith(QUIET_SERVICES):
            return logging.DEBUG
        return logging.INFO
