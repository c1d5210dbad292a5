"""``order-gateway backup``: a consistent copy of a SQLite store, taken while it serves.

SQLite's online backup API copies the database as one read transaction sees it (all
pages in one step), so the copy holds exactly the commits made before it started, never
half of one. In WAL mode a reader never blocks the writer: the gateway keeps committing
while the copy is made. The copy is written next to its destination and renamed into
place once complete and synced (a hard link, so that a FILE that appeared meanwhile is
not replaced), so a FILE that exists is always a whole copy; it is in WAL mode like its
source and serves as it is.

PostgreSQL is backed up with its own tools (pg_dump; see docs/operations.md).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import threading
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from domain.errors import StoreError
from server.stores.factory import is_memory_url, sqlite_path, unsupported_url
from server.stores.sqlite import (
    DamagedFileError,
    file_problems,
    holds_a_checked_store,
    read_only_connection,
)
from server.stores.urls import redacted_url

PARTIAL_SUFFIX_BYTES = len(".0123456789ab.partial-journal")
"""What the names of the temporary copy (a random part of 12 hex digits) and of the
journal SQLite keeps beside it add to FILE's."""

NAME_MAX = 255
"""The longest file name, in bytes, where the file system does not tell (Linux's)."""


class BackupError(Exception):
    """The backup could not be taken; nothing was written at the destination."""


class DestinationError(ValueError):
    """FILE cannot be a backup's destination, whatever the store: a usage error."""


def backup(url: str, file: str) -> int:
    """Copy the SQLite store at ``url`` to ``file`` (a new file); returns the number of
    events in the copy."""
    source = _source(url)
    destination = _destination(file)
    try:
        found = source.is_file()
    except OSError as error:
        raise BackupError(f"cannot back up {source}: {error.strerror or error}") from error
    if not found:
        raise BackupError(f"no SQLite store at {source}")
    if destination.exists():
        raise BackupError(f"{destination} exists: the backup does not overwrite a file")
    _refuse_companions(destination)
    _refuse_unsyncable(destination)
    _refuse_no_store(source, url, destination)
    partial = _partial_name(destination)
    try:
        # Read-only: a backup never migrates or otherwise writes to the live store.
        with (
            read_only_connection(source) as live,
            closing(_create(partial, destination, stat.S_IMODE(source.stat().st_mode))) as copy,
        ):
            live.backup(copy)
            _check_copy(copy, url, destination)
            (events,) = copy.execute("SELECT count(*) FROM events").fetchone()
        with partial.open("rb+") as written:
            os.fsync(written.fileno())
        _publish(partial, destination)
    except StoreError as error:
        _remove(partial)
        raise BackupError(str(error)) from error
    except sqlite3.Error as error:
        _remove(partial)
        # The copy's writes fail as the store's reads do (a full disk at either end).
        raise BackupError(f"backup of {source} to {destination} failed: {error}") from error
    except OSError as error:
        _remove(partial)
        # Its own text only: the error's file name would be the temporary copy's.
        reason = error.strerror or error
        raise BackupError(f"backup of {source} to {destination} failed: {reason}") from error
    except BaseException:
        _remove(partial)
        raise
    return int(events)


def _refuse_no_store(source: Path, url: str, destination: Path) -> None:
    """Refuse, before anything is written, what verify refuses, with its message: an
    empty file, another program's database, a store that lost a table, a file that is no
    database. A store SQLite finds damaged as it opens it (one cut short, its header
    counting pages the file no longer has) is refused as a copy that fails its check."""
    try:
        holds = holds_a_checked_store(source)
    except DamagedFileError as error:
        raise _damaged(url, destination, [error.reason]) from error
    except StoreError as error:
        raise BackupError(str(error)) from error
    if not holds:
        raise BackupError(f"no gateway schema in {source}")


def _check_copy(copy: sqlite3.Connection, url: str, destination: Path) -> None:
    """Refuse a copy with damaged pages. The backup API copies pages as they are, so a
    damaged store makes a damaged copy, which would pass for a backup until a restore.
    quick_check reads every page (about 0.5 s per million events); integrity_check's
    index cross-checks are left to verify."""
    if problems := file_problems(copy, "quick_check"):
        raise _damaged(url, destination, problems)


def _damaged(url: str, destination: Path, problems: list[str]) -> BackupError:
    return BackupError(
        f"the store is damaged, so {destination} was not written: {problems[0]}"
        + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
        + f". Run 'order-gateway verify --store {redacted_url(url)}' for what is wrong"
    )


def _source(url: str) -> Path:
    """The SQLite file ``url`` names; any other store is refused, one this gateway does
    not know as verify and serve refuse it."""
    source = sqlite_path(url)
    if source is not None:
        return source
    if url.startswith(("postgresql:", "postgres:")):
        raise BackupError(
            f"backup copies SQLite stores only, not {redacted_url(url)!r}: back PostgreSQL "
            "up with pg_dump (see docs/operations.md)"
        )
    if is_memory_url(url):
        raise BackupError(f"backup copies SQLite stores only, not {redacted_url(url)!r}")
    raise unsupported_url(url)


def _destination(file: str) -> Path:
    """``file`` as the new copy's path, once it can be one: a file's name in a directory
    that exists. Checked before anything is copied, and named as given."""
    if not file:
        # Path("") is the working directory: it would be refused as naming a directory,
        # when nothing was named at all (an unset variable in a script's command line).
        raise DestinationError("FILE is empty: name the new copy's path")
    destination = Path(file)
    # Path() drops a trailing "/": "backups/" would make a file named backups.
    if file.endswith(os.sep) or destination.name in ("", ".", ".."):
        raise DestinationError(f"cannot back up to {file}: it names a directory, not a file")
    directory = destination.parent
    if not directory.is_dir():
        raise DestinationError(f"cannot back up to {file}: no directory {directory}")
    if len(os.fsencode(destination.name)) > _name_max(directory):
        raise DestinationError(f"cannot back up to {file}: its name is too long")
    if destination.is_dir():
        raise DestinationError(f"cannot back up to {file}: it names a directory, not a file")
    return destination


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return NAME_MAX


def _partial_name(destination: Path) -> Path:
    """Where the copy is written until it is whole: beside ``destination``, under a name
    of this backup's own, never a file someone else keeps nor another backup's. FILE's
    name is cut short there when the temporary name would be longer than the file system
    takes."""
    room = _name_max(destination.parent) - PARTIAL_SUFFIX_BYTES
    stem = destination.name
    while len(os.fsencode(stem)) > room:
        stem = stem[:-1]  # a character at a time: never half of one's bytes
    return destination.with_name(f"{stem}.{uuid.uuid4().hex[:12]}.partial")


def _remove(partial: Path) -> None:
    """The unfinished copy, and the journal SQLite keeps beside it while writing. Only
    what is there: a read-only file system refuses to unlink even a missing name (EROFS,
    not ENOENT), which would hide why the copy could not be made."""
    for path in (partial, partial.with_name(f"{partial.name}-journal")):
        if os.path.lexists(path):
            path.unlink(missing_ok=True)


COMPANION_SUFFIXES = ("-wal", "-shm", "-journal")
"""The files SQLite keeps beside a database and opens with it."""

REPLAYED_SUFFIXES = ("-wal", "-journal")
"""The companions whose content SQLite applies to the database when it opens it."""


def _refuse_companions(destination: Path) -> None:
    """Refuse a FILE that SQLite would not open as the copy alone. A ``FILE-wal`` or
    ``FILE-journal`` with content, left by a deleted database, is applied to the copy
    when it is opened (nothing in them names the file they belong to): the copy would
    read as damaged, and a gateway would write that mix into it. (Empty ones, and a
    ``-shm``, as ``verify`` leaves beside a copy it checked, are harmless.) A FILE named
    as another database's companion is taken for it and overwritten or deleted by the
    next process that opens that database."""
    for suffix in REPLAYED_SUFFIXES:
        beside = destination.with_name(destination.name + suffix)
        try:
            holds_content = beside.stat().st_size > 0
        except OSError:
            holds_content = False  # Not there (or out of reach, and so out of SQLite's).
        if holds_content:
            raise BackupError(
                f"cannot back up to {destination}: {beside} is there, which SQLite would"
                " apply to the copy; remove it or choose another name"
            )
    for suffix in COMPANION_SUFFIXES:
        stem = destination.name.removesuffix(suffix)
        if stem and stem != destination.name:
            owner = destination.with_name(stem)
            if os.path.lexists(owner):
                raise BackupError(
                    f"cannot back up to {destination}: SQLite would take it for {owner}'s"
                    f" {suffix.lstrip('-')} file; choose another name"
                )


def _refuse_unsyncable(destination: Path) -> None:
    """The copy's name is made durable by syncing its directory, which must be opened
    (for reading) to be synced: checked before anything is copied, so that a directory
    this user may only write and enter (``-wx``) is refused with nothing in it, not
    reported as a failed backup once the copy is there."""
    directory = destination.parent
    try:
        os.close(os.open(directory, os.O_RDONLY))
    except OSError as error:
        raise BackupError(
            f"cannot back up to {destination}: its directory {directory} cannot be opened"
            f" to sync the copy's name into it ({error.strerror or error})"
        ) from error


def _publish(partial: Path, destination: Path) -> None:
    """Give the finished copy its name, unless a file took that name meanwhile: a hard
    link fails where a rename would replace the file."""
    _refuse_companions(destination)
    try:
        os.link(partial, destination)
    except FileExistsError:
        raise BackupError(f"{destination} exists: the backup does not overwrite a file") from None
    except OSError:
        # A file system without hard links: the check before the copy has to do.
        if destination.exists():
            raise BackupError(
                f"{destination} exists: the backup does not overwrite a file"
            ) from None
        partial.rename(destination)
    else:
        partial.unlink()
    folder = os.open(destination.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _create(partial: Path, destination: Path, mode: int) -> sqlite3.Connection:
    """The copy's connection, its file with the store's permissions (``mode``) before
    anything is copied into it: a store only its owner may read holds customers' names
    and addresses, and so does its copy. An error here is the destination's, not the
    store's."""
    try:
        connection = sqlite3.connect(partial)
    except sqlite3.Error as error:
        raise BackupError(f"cannot create {destination}: {error}") from error
    try:
        # SQLite creates the file at the first write; an empty one now, to set its mode.
        partial.touch(exist_ok=True)
        partial.chmod(mode)
    except OSError as error:
        connection.close()
        raise BackupError(f"cannot create {destination}: {error}") from error
    return connection


@contextmanager
def stops_interrupt() -> Iterator[None]:
    """Within it, SIGTERM, and SIGHUP (its terminal closed: a dropped ssh connection), end
    a backup as Ctrl-C does, its unfinished copy removed (exit 143 or 129), rather than
    killing the process with the copy left behind. A SIGHUP ignored (``nohup``) stays
    ignored."""

    def interrupt(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield  # Signals reach the main thread alone (a caller running it in a thread).
        return
    stops = [signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        stops.append(signal.SIGHUP)
    previous = {signum: signal.signal(signum, interrupt) for signum in stops}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
