"""Stores that can commit a lone append on the caller's event loop itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable


@runtime_checkable
class CommitsOnLoop(Protocol):
    """A store whose appends otherwise go through a writer thread (``SQLiteEventStore``)."""

    def commit_on_loop_when(self, alone: Callable[[], bool]) -> None:
        """Commit on the event loop while ``alone()``: no other command in flight."""
