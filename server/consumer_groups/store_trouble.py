"""How a consumer group's runtime reports a store it cannot reach.

While PostgreSQL is down (or a SQLite worker's supervisor is away), each of a group's
background tasks fails every time it tries: storing checkpoints and parks every flush,
storing failed attempts, reading the log. A traceback each time would bury the event
store's own fault lines (``server.observability.store_faults``), which say what is wrong
and when it ends. So a store fault is one WARNING when a task's calls start failing, with
the cause and no traceback, and one INFO line once they work again with no failure for
``quiet`` seconds (a flush that has nothing to write works whatever the store's state:
without the wait, an outage would read as a pair of lines every few seconds); anything
else is still logged with its traceback, as a fault of the gateway's own.
"""

from __future__ import annotations

import logging
import time

from domain.errors import StoreError

log = logging.getLogger("order_gateway.consumer_groups")


class StoreTrouble:
    """The failures of one background task of one group (``what`` it does)."""

    def __init__(self, group: str, what: str, quiet: float) -> None:
        self._group = group
        self._what = what
        self._quiet = quiet
        self._failing = False
        self._failed_at = 0.0

    def failed(self, error: Exception) -> None:
        if not isinstance(error, StoreError):
            log.exception("consumer group %r: %s failed", self._group, self._what)
            return
        if not self._failing:
            log.warning(
                "consumer group %r: %s failed (%s); trying again until it works",
                self._group,
                self._what,
                error,
            )
        self._failing = True
        self._failed_at = time.monotonic()

    @property
    def failing(self) -> bool:
        return self._failing

    def worked(self) -> None:
        if self._failing and time.monotonic() - self._failed_at >= self._quiet:
            self._failing = False
            log.info("consumer group %r: %s works again", self._group, self._what)
