"""SQLite's errors as the store errors the gateway answers by: full, unavailable, or
anything else (which a client sees as INTERNAL)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from domain.errors import StoreError, StoreFullError, StoreUnavailableError
from server.stores.sqlite_space import out_of_space

UNAVAILABLE_CODES: Final = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_CANTOPEN",
    "SQLITE_READONLY",
)
"""Result codes (and their extended codes: ``SQLITE_IOERR_FSYNC`` …) meaning the file
cannot be used right now: another process holds the lock past the busy timeout, the
operating system failed a read, write or sync, or the file may not be written."""


def store_error(message: str, cause: BaseException, database: Path | None = None) -> StoreError:
    """The store error to raise ``from cause``: full, unavailable, or anything else
    (``database``: the file a write failed on, to tell an I/O error that is a full disk
    or a file size limit from one that is not)."""
    # Errors the sqlite3 module raises itself (a value it cannot bind) have no code.
    name = getattr(cause, "sqlite_errorname", None) or ""
    error: StoreError
    if name == "SQLITE_FULL" or (name.startswith("SQLITE_IOERR") and out_of_space(database)):
        # The disk, the file's max_page_count, or (an I/O error) the file size limit or
        # a quota. SQLite rolls the statement back.
        error = StoreFullError(message)
    elif name.startswith(UNAVAILABLE_CODES):
        error = StoreUnavailableError(message)
    else:
        error = StoreError(message)
    error.__cause__ = cause
    return error
