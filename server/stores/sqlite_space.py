"""Whether a failed SQLite write ran out of space, when SQLite cannot tell.

SQLite reports ``SQLITE_FULL`` only when the operating system says ENOSPC. A write that
reaches the process's file size limit (``ulimit -f``: EFBIG) or a disk quota (EDQUOT)
comes back as a plain ``SQLITE_IOERR``, which alone would read as "the store cannot be
reached, retry". Both mean the same to a client as a full disk: nothing was committed,
and retrying will not help until someone makes room.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

HEADROOM_BYTES = 1 << 20
"""Less than this left under a limit or on the disk counts as none: SQLite writes whole
pages, a commit several of them, and the WAL grows in steps."""


def out_of_space(database: Path | None) -> bool:
    """True if the file ``database``, or its WAL, is at the file size limit, or its disk
    has (almost) nothing left for this process."""
    if database is None:
        return False
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY:
        for file in (database, database.with_name(database.name + "-wal")):
            try:
                if file.stat().st_size + HEADROOM_BYTES >= limit:
                    return True
            except OSError:
                continue
    try:
        disk = os.statvfs(database.parent)
    except OSError:
        return False
    return disk.f_bavail * disk.f_frsize < HEADROOM_BYTES
