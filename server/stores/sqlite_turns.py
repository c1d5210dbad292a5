"""Turns at a SQLite file's write lock for the writers of several processes.

SQLite lets one connection write at a time, and a connection that finds the write lock
taken polls for it with sleeps of 1 to 100 ms (its busy handler): writers of several
processes on one file would queue on those sleeps, not on the lock's release. Writers
that take a turn here first (an exclusive ``flock`` on a file beside the database) wait
in the kernel instead, which hands the turn on the moment it is released, and then find
SQLite's lock free. The kernel releases a turn whose process dies, however it dies.

``flock`` locks are apart from the POSIX record locks SQLite itself takes on the database
file, which is why the turn is a file of its own: a second descriptor on the database,
once closed, would drop the SQLite locks of the whole process.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def turns_file(database: Path) -> Path:
    return database.with_name(database.name + "-writers")


class WriterTurns:
    """The turn of one writer among those of every process on ``database``."""

    def __init__(self, database: Path) -> None:
        self._fd = os.open(turns_file(database), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def take(self) -> None:
        """Block (without the GIL) until no other writer holds a turn."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def try_take(self) -> bool:
        """Take the turn if no other writer holds one, without waiting."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)
