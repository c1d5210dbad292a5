"""Middleware for the command bus: logging, idempotency, retry on concurrency conflicts."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict

from domain.bus import Next, Result
from domain.commands import Command
from domain.errors import (
    CommandIdReusedError,
    ConcurrencyConflictError,
    DomainError,
    StoreError,
)
from domain.fingerprints import is_same_request
from domain.ports import CommandRecord, EventStore

log = logging.getLogger("order_gateway.bus")

REMEMBERED_COMMANDS = 10_000
"""Client-chosen command ids each process remembers seeing recorded (about 1.5 MB)."""


class LoggingMiddleware:
    """Logs each command's outcome and duration at DEBUG (errors a client caused at INFO)."""

    async def __call__(self, command: Command, call_next: Next) -> Result:
        started = time.perf_counter()
        name = type(command).__name__
        try:
            result = await call_next(command)
        except DomainError as error:
            log.info(
                "%s %s rejected: %s (%.1f ms)",
                name,
                command.command_id,
                error.reason,
                (time.perf_counter() - started) * 1e3,
            )
            raise
        if log.isEnabledFor(logging.DEBUG):  # not even the arguments when it is not
            log.debug(
                "%s %s committed %d events (%.1f ms)",
                name,
                command.command_id,
                len(result),
                (time.perf_counter() - started) * 1e3,
            )
        return result


class IdempotencyMiddleware:
    """Replays a committed command's events instead of running it again.

    A new command pays no lookup: it runs, and its ``command_id`` is looked up only when
    it is refused, by the store as a duplicate (a command's id is recorded in the
    transaction of its events, so no command commits twice) or by a rule (a retry of a
    committed command meets the state it left: stock taken, the order cancelled). A
    replay thus still wins over NOT_FOUND and business rules, and the same
    ``command_id`` for another request is still ALREADY_EXISTS. Looking every
    client-chosen id up before running the command cost a read handed to a store thread
    and back on SQLite, and a round trip on PostgreSQL.

    A retry that runs costs more than its own refusal: commands decided meanwhile on the
    state it would leave (``domain.unit_of_work`` pipelines commands on a stream) must be
    decided again. So the last ids this process saw recorded (it committed them, or
    replayed them) are remembered, and a retry of one of them (a client retrying on the
    same connection) is looked up first, as every command was before. Only committed
    commands are recorded, so a retry of a failed command runs afresh.
    """

    def __init__(self, store: EventStore, remembered: int = REMEMBERED_COMMANDS) -> None:
        self._store = store
        self._remembered = remembered
        self._recorded: OrderedDict[str, None] = OrderedDict()
        """Client-chosen ids this process saw recorded, oldest first."""

    async def __call__(self, command: Command, call_next: Next) -> Result:
        if command.server_chose_id:
            # A fresh random id: nothing can have been recorded under it.
            return await call_next(command)
        if command.command_id in self._recorded:
            replay = await self._replay(command)
            if replay is not None:
                return replay
        try:
            result = await call_next(command)
        except DomainError:
            replay = await self._replay(command)
            if replay is None:
                raise
            self._remember(command.command_id)
            return replay
        self._remember(command.command_id)
        return result

    def _remember(self, command_id: str) -> None:
        self._recorded[command_id] = None
        if len(self._recorded) > self._remembered:
            self._recorded.popitem(last=False)

    async def _replay(self, command: Command) -> Result | None:
        record = await self._store.find_command(command.command_id)
        if record is None:
            return None
        if not is_same_request(record.fingerprint, command):
            raise CommandIdReusedError(command.command_id)
        _refuse_damaged(record)
        return list(record.events)


def _refuse_damaged(record: CommandRecord) -> None:
    """A record is committed with its command's events, so one that points at no event,
    or at another command's, was damaged after (a restore of one table and not the other,
    an edit by hand): replaying it would answer a retry with events it did not commit."""
    if not record.events:
        raise StoreError(
            f"the record of command {record.command_id} points at no event: the store is"
            " damaged; order-gateway verify reports where"
        )
    for event in record.events:
        if event.command_id != record.command_id:
            raise StoreError(
                f"the record of command {record.command_id} points at position"
                f" {event.position}, an event of command {event.command_id}: the store is"
                " damaged there; order-gateway verify reports what else is"
            )


class RetryOnConflictMiddleware:
    """Re-runs a command that lost an optimistic-concurrency race (it reloads fresh state).

    Backoff is short and jittered so that replicas contending for one stream spread out.
    """

    def __init__(self, attempts: int = 8, base_delay: float = 0.002) -> None:
        self._attempts = attempts
        self._base_delay = base_delay

    async def __call__(self, command: Command, call_next: Next) -> Result:
        attempt = 1
        while True:
            try:
                return await call_next(command)
            except ConcurrencyConflictError as conflict:
                if attempt >= self._attempts:
                    if conflict.fault is not None:
                        # The commits it was decided on failed for the store's fault (a
                        # full disk): that is what the caller can act on, not a conflict.
                        raise type(conflict.fault)(str(conflict.fault)) from conflict
                    raise
            await asyncio.sleep(random.uniform(0, self._base_delay * 2**attempt))
            attempt += 1
