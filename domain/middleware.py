"""Middleware for the command bus: logging, idempotency, retry on concurrency conflicts."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from domain.bus import Next, Result
from domain.commands import Command
from domain.errors import (
    CommandIdReusedError,
    ConcurrencyConflictError,
    DomainError,
    DuplicateCommandError,
)
from domain.fingerprints import is_same_request
from domain.ports import EventStore

log = logging.getLogger("order_gateway.bus")


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

    Runs before the handler, so a replay wins over NOT_FOUND and business rules; a
    concurrent duplicate that loses the race at append time is resolved the same way.
    Only committed commands are recorded, so a retry of a failed command runs afresh.
    """

    def __init__(self, store: EventStore) -> None:
        self._store = store

    async def __call__(self, command: Command, call_next: Next) -> Result:
        if command.server_chose_id:
            # A fresh random id: looking it up would only cost a store round trip.
            return await call_next(command)
        replay = await self._replay(command)
        if replay is not None:
            return replay
        try:
            return await call_next(command)
        except DuplicateCommandError:
            replay = await self._replay(command)
            if replay is None:
                raise
            return replay

    async def _replay(self, command: Command) -> Result | None:
        record = await self._store.find_command(command.command_id)
        if record is None:
            return None
        if not is_same_request(record.fingerprint, command):
            raise CommandIdReusedError(command.command_id)
        return list(record.events)


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
            except ConcurrencyConflictError:
                if attempt >= self._attempts:
                    raise
            await asyncio.sleep(random.uniform(0, self._base_delay * 2**attempt))
            attempt += 1
