"""The access log: one line per RPC, readable as text or as JSON fields.

Only what ``RpcOutcome`` carries is logged: never metadata as a whole, so bearer tokens
(and any other credential a client sends) cannot reach the log.

Lines are written in batches, a few milliseconds after their calls end, from the event
loop. Measured with ``python -m bench`` (CreateOrder, 16 concurrent): a line logged inside
each call cost about 40 µs of server CPU, between its call's other work and grpc's; the
same lines logged back to back in a batch cost a fraction of that, because the logging
code stays hot in the CPU's caches. Each line keeps the time its call ended. Server faults
are logged at once, beside the error they report; ``flush`` writes what is pending (the
gateway calls it when it stops).

When the handler ``configure_logging`` installs is the only one the lines would reach (as
under ``order-gateway serve``), its formatter makes each line from its parts and the batch
is written to it at once: counted by callgrind, a text line cost about 79,000 instructions
as a LogRecord handled by ``logging``, 32,000 this way. Under any other configuration (an
embedding application's, a test's log capture) the lines go through ``logging`` as records.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from types import MappingProxyType

import grpc

from server.observability.hooks import RpcOutcome
from server.observability.logs import sole_gateway_handler

log = logging.getLogger("order_gateway.access")

QUIET_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")
"""Logged at DEBUG: health probes arrive every few seconds and would drown the log."""

SERVER_FAULTS = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
)
"""Logged at WARNING: the server's fault, not the client's."""

_SERVER_FAULT_NAMES = frozenset(code._name_ for code in SERVER_FAULTS)
"""``SERVER_FAULTS`` by the codes' names: a lookup by the member hashes it in Python,
some 900 instructions a call under callgrind; a lookup by its name hashes a string."""

FLUSH_DELAY = 0.01
"""Seconds a line may wait for others to be logged with it."""

MAX_PENDING = 1_000
"""Lines that are logged at once, without waiting for the delay."""


class AccessLog:
    def __init__(self, flush_delay: float = FLUSH_DELAY, max_pending: int = MAX_PENDING) -> None:
        self._flush_delay = flush_delay
        self._max_pending = max_pending
        self._pending: list[tuple[RpcOutcome, int, float]] = []
        self._timer: asyncio.TimerHandle | None = None

    def rpc_finished(self, outcome: RpcOutcome) -> None:
        level = self._level(outcome)
        if not log.isEnabledFor(level):
            return
        if level >= logging.WARNING:
            # Earlier lines first, so that the log stays in the order calls ended.
            self.flush()
            _write([(outcome, level, time.time())])
            return
        self._pending.append((outcome, level, time.time()))
        if len(self._pending) >= self._max_pending:
            self.flush()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + self._flush_delay, self._flush_due)

    def _flush_due(self) -> None:
        self._timer = None  # It has run: nothing to cancel.
        self.flush()

    def flush(self) -> None:
        """Log every pending line now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        if pending:
            _write(pending)

    @staticmethod
    def _level(outcome: RpcOutcome) -> int:
        if outcome.code._name_ in _SERVER_FAULT_NAMES:
            return logging.WARNING
        # Not outcome.service, a property that costs some 2,000 instructions: with no "/"
        # in them, the prefixes can only match the service part of the method.
        if outcome.method.lstrip("/").startswith(QUIET_SERVICES):
            return logging.DEBUG
        return logging.INFO


MESSAGE = "%s %s %.1f ms request_id=%s correlation_id=%s user=%s peer=%s"
TRACED_MESSAGE = MESSAGE + " trace_id=%s"
"""With tracing on: the line names the call's trace, in text as in JSON."""


def _write(lines: list[tuple[RpcOutcome, int, float]]) -> None:
    sole = sole_gateway_handler(log)
    if sole is None:
        _handle(lines)
        return
    handler, formatter = sole
    with_fields = formatter.uses_fields
    parts: list[str] = []
    for outcome, level, ended in lines:
        if level >= handler.level:
            message, args, fields = _parts(outcome, with_fields)
            parts.append(
                formatter.line(
                    ended,
                    _msecs(ended),
                    logging.getLevelName(level),
                    log.name,
                    message % args,
                    fields,
                )
            )
            parts.append(handler.terminator)
    if not parts:
        return
    try:
        handler.write("".join(parts))
    except Exception:
        # Through logging one by one, which reports each line it cannot write
        # (Handler.handleError) as it would have.
        _handle(lines)


def _handle(lines: list[tuple[RpcOutcome, int, float]]) -> None:
    for outcome, level, ended in lines:
        message, args, fields = _parts(outcome)
        record = log.makeRecord(
            log.name, level, "", 0, message, args, None, extra={"fields": fields}
        )
        # The time the call ended, not the time of the batch.
        record.relativeCreated -= (record.created - ended) * 1000
        record.created = ended
        record.msecs = _msecs(ended)
        log.handle(record)


_NO_FIELDS: Mapping[str, object] = MappingProxyType({})
"""The fields of a line whose format does not print them."""


def _parts(
    outcome: RpcOutcome, with_fields: bool = True
) -> tuple[str, tuple[object, ...], Mapping[str, object]]:
    """The line's message format (``MESSAGE`` or ``TRACED_MESSAGE``), its arguments, and
    the fields of the JSON line (none unless ``with_fields``: a text line leaves them
    out, and building them cost about 2,000 instructions a line)."""
    duration_ms = round(outcome.duration * 1e3, 3)
    # The enum's documented _name_: its name property costs some 1,300 instructions.
    code = outcome.code._name_
    args = (
        outcome.method,
        code,
        duration_ms,
        outcome.request_id,
        _word(outcome.correlation_id),
        _word(outcome.user_id),
        outcome.peer,
    )
    if not with_fields:
        if outcome.trace_id:
            return TRACED_MESSAGE, (*args, outcome.trace_id), _NO_FIELDS
        return MESSAGE, args, _NO_FIELDS
    fields: dict[str, object] = {
        "method": outcome.method,
        "code": code,
        "duration_ms": duration_ms,
        "request_id": outcome.request_id,
        "correlation_id": outcome.correlation_id,
        "user_id": outcome.user_id,
        "peer": outcome.peer,
    }
    if outcome.trace_id:
        fields["trace_id"] = outcome.trace_id
        return TRACED_MESSAGE, (*args, outcome.trace_id), fields
    return MESSAGE, args, fields


def _word(value: str) -> str:
    """A value a client chose (its correlation id, a token's subject), as one word of the
    line: quoted and escaped as JSON when it has a space, ``=``, a quote or a character
    that is not printable, so that it cannot read as more fields (``x user=root``); ``-``
    when empty, and so quoted when it is ``-`` itself (a user of that name is no
    anonymous caller)."""
    if not value:
        return "-"
    # Four C scans of the string for the characters that need quotes: a frozenset's
    # ``isdisjoint(value)`` made and hashed a string of each character, about 3,700
    # instructions more for a 36-character id.
    if (
        value != "-"
        and value.isprintable()
        and " " not in value
        and "=" not in value
        and '"' not in value
        and "\\" not in value
    ):
        return value
    quoted = json.dumps(value, ensure_ascii=False)
    if quoted.isprintable():
        return quoted
    # JSON escapes only the ASCII controls: also escape what else is not printable (a
    # line or paragraph separator, a C1 control, a bidirectional override), which some
    # readers take for a line break or which reorders the line on screen.
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in quoted)


def _msecs(ended: float) -> float:
    return int((ended - int(ended)) * 1000) + 0.0
