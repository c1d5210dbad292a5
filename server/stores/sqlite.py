"""The SQLite event store: durable on one machine, the gateway's default.

Threads, so that SQLite never blocks the event loop:

- one **writer** thread owns the only write connection. Appends are queued to it; it takes
  whatever has queued up (up to ``max_batch``) and writes it as one transaction with one
  fsync (**group commit**). A commit that conflicts or repeats a command id fails alone
  and the others in the batch still commit: the writer decides the whole batch in Python
  from one read under the write lock (``sqlite_decide``) and inserts it with two
  statements; if that cannot decide, or an insert fails anyway, the batch is written
  again with each commit in its own SAVEPOINT, where the database's keys decide.
- a few **reader** threads, each with its own connection, taking reads from one queue:
  in WAL mode readers never wait for the writer, and each SELECT sees only committed
  transactions. Two or more, so that one long read does not hold up the short ones.

Callers are answered on their own event loop, a batch at a time (``sqlite_calls``); an
append is answered once its batch's COMMIT has returned, which with ``synchronous=FULL``
means the WAL is fsynced. A lone append (``commit_on_loop_when``) is written on the event
loop itself, never waiting there for a lock: there is no batch to gather, and the two
thread wake-ups of the round trip are most of what it would add to the call's latency.

Several processes may write the file (``serve --workers N``): opened with
``writer_turns``, the writer takes a turn among them (``sqlite_turns``) before SQLite's
lock, and the appends queued while it waited for its turn share its transaction.

Positions: all writers, in this process or any other, serialise on SQLite's single write
lock (``BEGIN IMMEDIATE``), and positions are assigned inside that lock from the committed
maximum. A committed prefix of positions is therefore all a reader can ever see: no lower
position can commit after a higher one became visible, which ``read_all`` relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import functools
import logging
import os
import re
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast

from domain.errors import (
    ConcurrencyConflictError,
    DomainError,
    DuplicateCommandError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)
from domain.ports import (
    CommandRecord,
    Commit,
    EventPayload,
    RecordedEvent,
    Snapshot,
    recorded_events,
)
from server.consumer_groups.store_sqlite import SQLiteConsumerGroupStore
from server.stores.event_rows import DATA, EventRow, UndecodableRowError
from server.stores.sqlite_calls import NO_LISTENERS, Call, CallQueue, Listeners, answer
from server.stores.sqlite_decide import conflict, decide, stream_ids
from server.stores.sqlite_errors import store_error
from server.stores.sqlite_schema import (
    ForeignDatabaseError,
    SchemaTooNewError,
    SchemaTooOldError,
    check,
    migrate,
    require_latest,
)
from server.stores.sqlite_turns import WriterTurns

log = logging.getLogger("order_gateway.store.sqlite")

T = TypeVar("T")

EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MICROSECOND: Final = dt.timedelta(microseconds=1)
BUSY_TIMEOUT_SECONDS: Final = 30.0
"""How long a connection waits for another process's write lock before giving up; for
the writer, how long a queued append waits in all (``SQLiteEventStore._lock_wait_from``)."""
READ_BATCH: Final = 32
"""Reads a reader thread takes at once; answered together, like a write batch."""

Query = Callable[[sqlite3.Connection], Any]
Append = Call[Commit, list[RecordedEvent]]

_COLUMNS = (
    "event_id, stream_id, stream_version, position, occurred_at_us,"
    " command_id, correlation_id, user_id, event_type, data, schema_version"
)
"""In ``RecordedEvent`` field order, so that a row maps onto it by position."""
INSERT_COMMAND = (
    "INSERT INTO commands (command_id, fingerprint, first_position, event_count)"
    " VALUES (?, ?, ?, ?)"
)
HEAD = "SELECT coalesce(max(position), 0) FROM events"
MARKED_AS_A_STORE = "SELECT user_version >= 1 FROM pragma_user_version"
"""Whether a database records a gateway schema version: a store, whole or damaged, or
another program's file that uses ``user_version`` too (``sqlite_schema.check`` tells
which and why)."""
READ_STREAM = (
    f"SELECT {_COLUMNS} FROM events"
    " WHERE stream_id = ? AND stream_version > ? ORDER BY stream_version"
)
READ_ALL = f"SELECT {_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?"
READ_STREAM_AFTER = (
    f"SELECT {_COLUMNS} FROM events"
    " WHERE stream_id = ? AND position > ? ORDER BY stream_version LIMIT ?"
)
"""A stream's versions follow its positions (each is appended after the one before it
committed), so this walks the (stream_id, stream_version) index, whose entries carry the
position: O(length of the stream), never the whole log."""
READ_RANGE = f"SELECT {_COLUMNS} FROM events WHERE position BETWEEN ? AND ? ORDER BY position"
FIND_COMMAND = "SELECT fingerprint, first_position, event_count FROM commands WHERE command_id = ?"
LOAD_SNAPSHOT = (
    "SELECT stream_id, stream_version, schema_version, data FROM snapshots WHERE stream_id = ?"
)
READ_PAYLOADS = (
    "SELECT event_id, event_type, schema_version, data FROM events"
    " WHERE stream_id = ? AND stream_version > ? ORDER BY stream_version"
)
"""``READ_STREAM`` as ``EventPayload`` rows, for a load from a snapshot."""
SAVE_SNAPSHOT = (
    "INSERT INTO snapshots (stream_id, stream_version, schema_version, data) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (stream_id) DO UPDATE SET stream_version = excluded.stream_version,"
    " schema_version = excluded.schema_version, data = excluded.data"
    " WHERE snapshots.stream_version < excluded.stream_version"
)
READ_RECORDS = (
    "SELECT CAST(command_id AS BLOB), first_position, event_count, CAST(fingerprint AS BLOB)"
    " FROM commands WHERE command_id > CAST(? AS TEXT) ORDER BY command_id LIMIT ?"
)
"""Text read as bytes, and the page's start bound as bytes: a command id that is not
UTF-8 (a damaged file) is read, and paged past, exactly as stored."""

# No index on event_id (ids are unique by construction, and an index would cost every
# append): verify groups the whole log once.
REPEATED_EVENT_IDS = (
    "SELECT event_id, group_concat(position) FROM events WHERE position <= ?"
    " GROUP BY event_id HAVING count(*) > 1 ORDER BY min(position) LIMIT ?"
)


INSERT_EVENT = f"INSERT INTO events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
"""Run with ``executemany``: measured here about 40% cheaper per row than one multi-row
INSERT, which SQLite runs as a compound SELECT and which needs a new statement per size."""
MAX_LOOKUP: Final = 256
"""Most streams one batch-level SELECT looks up (a power of two, see ``_lookups``)."""
_STREAM_VERSION = "coalesce((SELECT max(stream_version) FROM events WHERE stream_id = ?), 0)"
"""Answered from the end of the (stream_id, stream_version) index, O(log n); ``WHERE
stream_id IN (…) GROUP BY`` would instead walk every entry of each stream, O(length)."""
_STREAM_LAST_EVENT = (
    "(SELECT event_id FROM events WHERE stream_id = ? ORDER BY stream_version DESC LIMIT 1)"
)
"""The id of a stream's last event (NULL: none), from the same end of the same index."""


def _lookups(values: list[str], most: int) -> list[tuple[list[str], list[str]]]:
    """``values`` in chunks of at most ``most`` (a power of two), each with the parameters
    to bind for it: the chunk padded to a power-of-two length by repeating its first value.
    Always at least one chunk, empty if ``values`` is.

    The driver prepares a statement once per distinct SQL text and caches it, and
    preparing one with dozens of terms costs ten times more than running it (measured
    here: ~150 µs against ~12 µs for 38 streams). Padding keeps the texts to a handful
    (1, 2, 4, … ``most`` terms) instead of one per batch size; a repeated value only
    repeats a lookup, so the answer is the same.
    """
    if len(values) <= most:
        # One chunk, as for nearly every batch: no slicing (2,900 instructions less).
        return [(values, _padded(values))]
    chunks = (values[start : start + most] for start in range(0, len(values), most))
    return [(chunk, _padded(chunk)) for chunk in chunks]


def _padded(chunk: list[str]) -> list[str]:
    """``chunk`` padded to a power-of-two length by repeating its first value."""
    size = 1 << (len(chunk) - 1).bit_length() if chunk else 0
    return chunk + chunk[:1] * (size - len(chunk)) if size != len(chunk) else chunk


@functools.lru_cache(maxsize=256)
def stream_heads_sql(count: int) -> str:
    """The versions of ``count`` streams, then their last events' ids, in one row (each
    stream's id bound twice)."""
    return "SELECT " + ", ".join([_STREAM_VERSION] * count + [_STREAM_LAST_EVENT] * count)


@functools.lru_cache(maxsize=16)
def find_ranges_sql(count: int) -> str:
    """The records of ``count`` command ids (padded as ``_lookups`` pads them)."""
    return (
        "SELECT command_id, first_position, event_count FROM commands"
        f" WHERE command_id IN ({', '.join('?' * count)})"
    )


_HEAD_ROW = "SELECT 0, max(position), NULL FROM events"
_STREAM_HEAD_ROW = "SELECT {n}, max(stream_version), event_id FROM events WHERE stream_id = ?"
"""The nth stream's version and the id of its last event (NULLs: no events), from one seek
of the end of the (stream_id, stream_version) index: with max() its only aggregate, SQLite
takes the bare column ``event_id`` from the row that has the maximum."""


@functools.lru_cache(maxsize=16)
def head_and_stream_heads_sql(count: int) -> str:
    """Rows of (0, the head position, NULL) and, for the nth of ``count`` streams, (n, its
    version, its last event's id), in no particular order.

    One SELECT per stream joined by UNION ALL, rather than ``stream_heads_sql``'s two
    subqueries per stream in one row: each stream's index is searched once, not twice
    (measured: 8,000 instructions less for two streams).
    """
    return " UNION ALL ".join(
        [_HEAD_ROW, *(_STREAM_HEAD_ROW.format(n=n) for n in range(1, count + 1))]
    )


def _event(row: tuple[Any, ...]) -> RecordedEvent:
    return RecordedEvent(row[0], row[1], row[2], row[3], EPOCH + row[4] * MICROSECOND, *row[5:])


def _record(commit: Commit, head: int) -> tuple[list[RecordedEvent], list[tuple[Any, ...]]]:
    """``commit``'s events recorded at the positions after ``head``, and their rows.

    A payload in bytes is bound as a ``bytearray``, stored as the same BLOB: the sqlite3
    module binds str, int, float and bytearray directly but first looks for an adapter
    for any other type, bytes included, and failing to find one raises and clears two
    AttributeErrors (measured: 2,300 instructions more per event). Anything else is
    bound as it is, for the driver to refuse as before.
    """
    recorded = recorded_events(commit, head + 1)
    occurred_at_us = (commit.occurred_at - EPOCH) // MICROSECOND
    rows = [
        (
            r.event_id,
            r.stream_id,
            r.stream_version,
            r.position,
            occurred_at_us,
            r.command_id,
            r.correlation_id,
            r.user_id,
            r.event_type,
            bytearray(r.data) if type(r.data) is bytes else r.data,
            r.schema_version,
        )
        for r in recorded
    ]
    return recorded, rows


def _connect(
    path: Path, busy_timeout: float = BUSY_TIMEOUT_SECONDS, immutable: bool = False
) -> sqlite3.Connection:
    # Autocommit mode (isolation_level=None): this module issues BEGIN/COMMIT itself.
    # Connections are handed between threads (opened by one, closed by another) but only
    # ever used by one thread at a time.
    if immutable:
        return sqlite3.connect(
            f"{path.resolve().as_uri()}?immutable=1",
            uri=True,
            timeout=busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
    return sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )


def beyond_writing(path: Path) -> bool:
    """Whether no process can be writing the store at ``path``: no -wal beside it, and
    none can be made there (read-only media or directory; a backup kept on them).

    SQLite reads a WAL file through its -wal and -shm, which it must create when they are
    not there, and so cannot read one from such a place unless told it is immutable; and
    it is: any writer would need a -wal (or a rollback journal) beside it.
    """
    return not wal_file(path).exists() and not os.access(path.parent, os.W_OK)


def _busy_timeout_pragma(seconds: float) -> str:
    return f"PRAGMA busy_timeout = {int(seconds * 1000):d}"


def _open_reader(path: Path, immutable: bool = False) -> sqlite3.Connection:
    connection = _connect(path, immutable=immutable)
    connection.execute("PRAGMA query_only = ON")
    # A connection's first statement reads the schema, and each statement is compiled on
    # its first use: done now for the reads of a cold load, which the first command on a
    # long stream after a restart would otherwise pay for (measured: 0.4 ms against 0.25).
    connection.execute(LOAD_SNAPSHOT, ("",)).fetchall()
    connection.execute(READ_PAYLOADS, ("", 0)).fetchall()
    return connection


def _open_writer(
    path: Path,
    writable: bool = True,
    busy_timeout: float = BUSY_TIMEOUT_SECONDS,
    immutable: bool = False,
) -> sqlite3.Connection:
    connection = _connect(path, busy_timeout, immutable)
    try:
        # Before anything is changed: the switch to WAL is for good, and makes the -wal
        # and -shm files beside another program's file too.
        check(connection)
        # WAL: readers and the writer do not block each other, and a commit is one
        # sequential write. FULL: COMMIT returns only after the WAL is fsynced. (An
        # immutable file is only read, as if it had no journal at all.)
        mode = "wal" if immutable else _journal_mode_wal(connection)
        if mode != "wal":
            raise StoreError(f"SQLite refused WAL mode for {path} (got {mode!r})")
        connection.execute("PRAGMA synchronous = FULL")
        if writable:
            migrate(connection)
            _refuse_read_only(connection)
        else:
            require_latest(connection)
    except BaseException:
        connection.close()
        raise
    return connection


UNDECODABLE_TEXT = "Could not decode to UTF-8"
"""How sqlite3 begins the error of a row whose text is not UTF-8 (a damaged file)."""


def _undecodable(
    connection: sqlite3.Connection, after_position: int, limit: int, reason: str
) -> StoreError:
    """The first row of ``READ_ALL(after_position, limit)`` whose text does not decode,
    read again as bytes, with the rows before it."""
    connection.text_factory = bytes
    try:
        raw = connection.execute(READ_ALL, (after_position, limit)).fetchall()
    finally:
        connection.text_factory = str

    def decoded(row: tuple[Any, ...], errors: str) -> EventRow:
        return cast(
            EventRow,
            tuple(
                value.decode("utf-8", errors) if isinstance(value, bytes) and i != DATA else value
                for i, value in enumerate(row)
            ),
        )

    before: list[EventRow] = []
    for row in raw:
        try:
            before.append(decoded(row, "strict"))
        except UnicodeDecodeError:
            return UndecodableRowError(decoded(row, "replace"), reason, before)
    return StoreError(f"reading the SQLite store failed: {reason}")


def foreign_leftovers(path: Path) -> str | None:
    """Why reading the store at ``path`` as this user would break it for its owner, or
    None when it would not.

    A WAL database is read through its -wal and -shm files, which SQLite creates when
    they are not there (the store is not open anywhere) and leaves behind a read-only
    connection. Created by a user other than the store's owner, they belong to that user,
    and the owner's gateway cannot open the store any more (attempt to write a readonly
    database). Root's are given to the store's owner by SQLite itself."""
    beside = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]
    if all(file.exists() for file in beside) or os.geteuid() == 0 or beyond_writing(path):
        # Beyond writing, nothing can be made beside it: it is read as immutable.
        return None
    try:
        owner = path.stat().st_uid
    except OSError:
        return None  # Not there: opening it says so.
    if owner == os.geteuid():
        return None
    return (
        f"reading {path} as this user (uid {os.geteuid()}) would leave "
        f"{beside[0].name} and {beside[1].name} beside it, owned by this user, and the "
        f"store's owner (uid {owner}) could not open the store after; run this as the "
        "store's owner or as root, or while the gateway serves it"
    )


_NOT_FILES: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def not_a_file(path: Path) -> str | None:
    """Why the store cannot be at ``path`` whatever it holds, or None for a regular file
    or nothing (it is created).

    Checked before the file is opened at all: opening a FIFO to write blocks until
    another process opens it to read, and reading one waits for data that never comes.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _NOT_FILES if test(mode)), "a device")
    return f"it is {kind}, not a file"


def may_write(path: Path) -> bool:
    """Whether this process may write the file at ``path`` (True if there is none: it is
    created), tried as SQLite would open it, whatever the user and its capabilities."""
    try:
        # First, so that a directory that may not be searched is reported as that.
        os.stat(path)
    except FileNotFoundError:
        return True
    try:
        os.close(os.open(path, os.O_WRONLY))
    except OSError as error:
        if isinstance(error, PermissionError) or error.errno == errno.EROFS:
            return False
        raise
    return True


def wal_file(path: Path) -> Path:
    """The -wal file beside the store at ``path``."""
    return path.with_name(path.name + "-wal")


def _identity(path: Path | str) -> tuple[int, int] | None:
    """The device and inode of the file at ``path``, or None if there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def orphaned_shm(path: Path) -> str | None:
    """Why the store at ``path`` must not be opened now, or None when it may be.

    SQLite deletes the -shm file only after the -wal file (the last connection's close),
    so a -shm without its -wal means the -wal was deleted while some process had the
    store open: such a process may still write to that deleted file, and the -shm
    indexes it. A new connection would create a fresh -wal beside it, holding none of
    those commits, and write where no other process reads.
    """
    wal = wal_file(path)
    shm = path.with_name(path.name + "-shm")
    if not shm.exists() or wal.exists():
        return None
    return (
        f"{shm.name} is there without {wal.name}, which was deleted while the store was"
        f" open; stop every process using the store, then remove {shm.name} (whatever"
        f" the deleted {wal.name} held and no process copied into the store is lost)"
    )


@contextlib.contextmanager
def read_only_connection(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection that only reads the store at ``path``, for a tool beside the gateway
    (``verify``, ``backup``); refused as ``open`` refuses a store it must not open.

    Even read-only, SQLite creates a WAL file's -wal and -shm beside it: beside a -shm
    whose -wal was deleted while a gateway still wrote to it, that fresh -wal would take
    the deleted one's name, and the gateway could no longer copy what it holds into the
    store (``SQLiteEventStore._save_lost_wal``). Those it made go again when it fails (it
    leaves them beside a file it finds damaged), unless a writer has used the -wal since:
    a gateway that started meanwhile would be writing to them.
    """
    if (leftovers := foreign_leftovers(path)) is not None:
        raise StoreError(f"cannot open the SQLite store {path}: {leftovers}")
    if (orphaned := orphaned_shm(path)) is not None:
        raise StoreUnavailableError(f"cannot open the SQLite store {path}: {orphaned}")
    beside = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]
    made = [file for file in beside if not file.exists()]
    mode = "immutable=1" if beyond_writing(path) else "mode=ro"
    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True)
        ) as connection:
            yield connection
    except sqlite3.Error:
        if not _written(beside[0]):
            for file in made:
                if file.exists():
                    file.unlink()
        raise


class DamagedFileError(StoreError):
    """SQLite finds the file's pages other than it wrote them (SQLITE_CORRUPT): a store cut
    short, as by a copy that did not finish, or overwritten. ``reason`` is SQLite's."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def holds_a_checked_store(path: Path) -> bool:
    """Whether the file at ``path``, only read, records a gateway schema version (as
    ``holds_a_store``); one that does is checked as ``open`` checks it, and refused with
    ``open``'s message: a tool beside the gateway (``backup``) names a store that lost a
    table, or a file that is no database, as ``verify`` and ``migrate`` do. A later
    release's store is taken for one if it has this release's tables and columns."""
    try:
        with read_only_connection(path) as connection:
            if not connection.execute(MARKED_AS_A_STORE).fetchone()[0]:
                return False
            check(connection, later_too=True)
    except ForeignDatabaseError as e:
        raise StoreError(f"cannot open the SQLite store {path}: {e}") from e
    except sqlite3.Error as e:
        if (e.sqlite_errorname or "").startswith("SQLITE_CORRUPT"):
            raise DamagedFileError(f"cannot open the SQLite store {path}: {e}", str(e)) from e
        raise store_error(f"cannot open the SQLite store {path}: {e}", e) from e
    return True


def _text(stored: bytes | None) -> str:
    return "" if stored is None else stored.decode("utf-8", "surrogateescape")


@contextlib.contextmanager
def _path_errors(path: Path) -> Iterator[None]:
    """What the system refuses about the store's path (a directory it may not search) as
    the store error it is: not a configuration error, since the setting may be right."""
    try:
        yield
    except OSError as e:
        raise StoreError(f"cannot open the SQLite store {path}: {e.strerror or e}") from e


def _unchecked(path: Path | None, error: OSError) -> str:
    return f"the files of the SQLite store {path} cannot be checked ({error.strerror or error})"


def _written(file: Path) -> bool:
    try:
        return file.stat().st_size > 0
    except FileNotFoundError:
        return False


def _refuse_read_only(connection: sqlite3.Connection) -> None:
    """Raise SQLITE_READONLY now if the file cannot be written: SQLite opens a file it may
    not write read-only, silently, and a migrated schema needs no write, so the first
    command would have been the first to find out. The header is rewritten as it is, in a
    transaction rolled back: a write SQLite refuses at once, and nothing reaches the file."""
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    connection.execute("BEGIN IMMEDIATE")
    try:
        # PRAGMA takes no parameters; ``version`` is the file's own integer.
        connection.execute(f"PRAGMA user_version = {int(version):d}")
    finally:
        connection.execute("ROLLBACK")


WAL_SWITCH_RETRY_SECONDS: Final = 0.005


def _journal_mode_wal(connection: sqlite3.Connection) -> str:
    """Switch to WAL (a no-op once the file is in WAL mode); returns the mode now.

    Several processes opening one new file at once race to switch it, and SQLite answers
    a loser SQLITE_BUSY at once, without waiting in its busy handler: measured here, 21
    of 360 processes opening fresh files six at a time failed so. Retried as long as
    the busy timeout allows, as a busy lock anywhere else would wait.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    while True:
        try:
            (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
            return str(mode)
        except sqlite3.OperationalError as e:
            if e.sqlite_errorname != "SQLITE_BUSY" or time.monotonic() >= deadline:
                raise
        time.sleep(WAL_SWITCH_RETRY_SECONDS)


def _open_snapshot_writer(path: Path, immutable: bool = False) -> sqlite3.Connection:
    connection = _connect(path, immutable=immutable)
    # A snapshot lost in a power failure only means a longer replay: no fsync of its own,
    # so that it holds SQLite's write lock, which the appends wait on, for the least time.
    # The next append's fsync makes it durable anyway.
    connection.execute("PRAGMA synchronous = NORMAL")
    return connection


def _lock_timeout(outcome: object) -> sqlite3.Error | None:
    """The driver's error if ``outcome`` is an append's failure to get the write lock
    within the busy timeout, else None."""
    if not isinstance(outcome, StoreUnavailableError):
        return None
    cause = outcome.__cause__
    if not isinstance(cause, sqlite3.Error):
        return None
    return cause if (cause.sqlite_errorname or "").startswith("SQLITE_BUSY") else None


def _is_fault(error: sqlite3.Error) -> bool:
    """True if ``error`` is the file's fault, not one commit's: every commit would fail."""
    return isinstance(store_error("", error), StoreFullError | StoreUnavailableError)


class SQLiteEventStore:
    """An ``EventStore`` in one SQLite file; open it with ``await SQLiteEventStore.open(path)``.

    ``max_batch`` caps how many commits share one transaction (1 turns group commit off);
    ``writer_turns``: other processes write the file too, taking turns (``sqlite_turns``);
    ``busy_timeout``: seconds an append waits for another process's write lock.
    """

    def __init__(
        self,
        writer: sqlite3.Connection,
        readers: list[sqlite3.Connection],
        loop: asyncio.AbstractEventLoop,
        max_batch: int,
        snapshot_writer: sqlite3.Connection | None = None,
        path: Path | None = None,
        turns: WriterTurns | None = None,
        busy_timeout: float = BUSY_TIMEOUT_SECONDS,
    ) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._busy_timeout_pragma = _busy_timeout_pragma(busy_timeout)
        self._waits_off = False
        """Whether the writer's busy timeout is 0, as a commit on the event loop leaves it
        (``_begin_at_once``) until a BEGIN that may wait (``_let_writes_wait``)."""
        # A descriptor of the file itself, to see that it is still linked (``_gone``).
        self._file = os.open(path, os.O_RDONLY) if path is not None else None
        # The -wal file SQLite writes: created by the writer's first read, and the same
        # file (inode) for as long as any connection to the store stays open.
        self._wal = wal_file(path) if path is not None else None
        # Its name as a str for ``_gone``'s ``os.stat``: a ``Path`` is converted by a
        # Python-level ``__fspath__`` call on every stat (1,400 instructions each time).
        self._wal_name = "" if self._wal is None else str(self._wal)
        self._wal_identity = _identity(self._wal_name) if self._wal is not None else None
        self._wal_saved = False
        self._turns = turns
        self._loop = loop
        self._snapshot_writer = snapshot_writer
        self._snapshot_lock = threading.Lock()
        self._max_batch = max_batch
        self._alone: Callable[[], bool] | None = None
        self._writing = threading.Lock()
        """Held by whoever writes: the writer thread, the event loop committing a lone
        append itself, or a snapshot's write."""
        self._listeners: Listeners = NO_LISTENERS
        """Replaced, never changed: the writer thread reads it without a lock."""
        self._listeners_lock = threading.Lock()
        self._writes: CallQueue[Commit, list[RecordedEvent]] = CallQueue()
        self._reads: CallQueue[Query, Any] = CallQueue()
        self._writer = writer
        # One cursor for the writer's batch statements: ``Connection.execute`` makes a new
        # cursor object for every statement.
        self._cursor = writer.cursor()
        # SQLite's bound-parameter limit is a build option (999 before 3.32, 32766 after,
        # some distributions raise it): ask this library rather than assume.
        bindable = writer.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        # So are the terms of a compound SELECT (500 by default): the head's and one per
        # stream in ``head_and_stream_heads_sql``.
        terms = writer.getlimit(sqlite3.SQLITE_LIMIT_COMPOUND_SELECT) - 1
        # Half the parameters: ``stream_heads_sql`` binds each stream's id twice.
        most = max(1, min(bindable // 2, terms))
        self._lookup_size = min(MAX_LOOKUP, 1 << (most.bit_length() - 1))
        self._threads = [
            threading.Thread(target=self._write_forever, name="sqlite-writer", daemon=True),
            *(
                threading.Thread(
                    target=self._read_forever, args=(reader,), name="sqlite-reader", daemon=True
                )
                for reader in readers
            ),
        ]
        for thread in self._threads:
            thread.start()

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        max_batch: int = 128,
        readers: int = 2,
        writer_turns: bool = False,
        writable: bool = True,
        busy_timeout: float = BUSY_TIMEOUT_SECONDS,
    ) -> SQLiteEventStore:
        """Open (creating or migrating as needed) the store in the file at ``path``;
        ``writable``: refuse a file that cannot be written (False: only read from, never
        migrated: a schema other than this release's is refused)."""
        if max_batch < 1 or readers < 1:
            raise ValueError("max_batch and readers must be at least 1")
        if busy_timeout < 0:
            raise ValueError("busy_timeout must not be negative")
        path = Path(path)
        with _path_errors(path):
            if (unusable := not_a_file(path)) is not None:
                raise StoreError(f"cannot open the SQLite store {path}: {unusable}")
            if not writable and (leftovers := foreign_leftovers(path)) is not None:
                raise StoreError(f"cannot open the SQLite store {path}: {leftovers}")
            if writable and not may_write(path):
                # Refused by SQLite too, but only once it had made the store's -wal and
                # -shm files as this user, which the store's owner could then not open.
                raise StoreError(
                    f"cannot open the SQLite store {path}: attempt to write a readonly database"
                )
            if (orphaned := orphaned_shm(path)) is not None:
                raise StoreUnavailableError(f"cannot open the SQLite store {path}: {orphaned}")
            immutable = not writable and beyond_writing(path)
        opened: list[sqlite3.Connection] = []
        try:
            opened.append(
                await asyncio.to_thread(_open_writer, path, writable, busy_timeout, immutable)
            )
            for _ in range(readers):
                opened.append(await asyncio.to_thread(_open_reader, path, immutable))
            opened.append(await asyncio.to_thread(_open_snapshot_writer, path, immutable))
        except (sqlite3.Error, SchemaTooNewError, SchemaTooOldError, ForeignDatabaseError) as e:
            for connection in opened:
                connection.close()
            if isinstance(e, sqlite3.Error):
                raise store_error(f"cannot open the SQLite store {path}: {e}", e) from e
            raise StoreError(f"cannot open the SQLite store {path}: {e}") from e
        turns = WriterTurns(path) if writer_turns else None
        loop = asyncio.get_running_loop()
        return cls(opened[0], opened[1:-1], loop, max_batch, opened[-1], path, turns, busy_timeout)

    @staticmethod
    async def holds_a_store(path: Path) -> bool:
        """Whether the file at ``path`` records a gateway schema version, read without
        creating, migrating or otherwise writing to it: a store that lost a table is
        still taken for one, so that ``open`` refuses it saying what it lacks."""

        def holds_gateway_schema() -> bool:
            with _path_errors(path):
                if not path.is_file():
                    return False
                with read_only_connection(path) as connection:
                    return bool(connection.execute(MARKED_AS_A_STORE).fetchone()[0])

        try:
            return await asyncio.to_thread(holds_gateway_schema)
        except sqlite3.Error as e:
            raise store_error(f"cannot open the SQLite store {path}: {e}", e) from e

    async def open_consumer_groups(self) -> SQLiteConsumerGroupStore:
        """Consumer-group records in the same file (``server.consumer_groups``)."""
        if self._path is None:
            raise StoreError("this SQLite store was not opened from a file")
        return await SQLiteConsumerGroupStore.open(self._path)

    # -- writing --------------------------------------------------------------------

    def commit_on_loop_when(self, alone: Callable[[], bool]) -> None:
        """Commit an append on the event loop itself while ``alone()`` is true: when no
        other command is in flight, the writer thread has no batch to gather, and handing
        a lone append to it and back costs two thread wake-ups (measured: ~0.15 ms of a
        CreateOrder's latency at one caller). ``alone`` is read at each append, and must
        be false whenever other commands are in flight: they group-commit through the
        writer, which an event loop blocked on a commit of its own would hold up."""
        self._alone = alone

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        alone = self._alone
        if (
            alone is not None
            and alone()
            and self._writes.empty()
            and self._writing.acquire(blocking=False)
        ):
            try:
                # Closing: the writer thread may be closing the connection after its
                # last batch; the queue refuses the append with the store's own error.
                done = None if self._writes.closing else self._commit_here(commit)
            finally:
                self._writing.release()
            if done is not None:
                # Written, or failed: never queued again for the writer thread.
                if isinstance(done.outcome, list):
                    return done.outcome
                if isinstance(done.outcome, BaseException):
                    raise done.outcome
                raise StoreError("the SQLite store did not handle this append")
        return await self._writes.submit(commit)

    def _commit_here(self, commit: Commit) -> Append | None:
        """On the event loop, with ``_writing`` held: ``commit`` written now; or None, having
        written nothing, for the writer thread to write: when the write lock is not free
        at once (another process's turn, or another connection's transaction), or when
        the commit must go commit by commit (``_write_once`` begins a transaction of its
        own, which could wait for the lock on the event loop)."""
        if self._turns is not None and not self._turns.try_take():
            return None
        try:
            if not self._begin_at_once():
                return None
            loop = asyncio.get_running_loop()
            append: Append = Call(commit, loop, loop.create_future())
            committed = self._write_or_fail([append], one_by_one=False)
        finally:
            if self._turns is not None:
                self._turns.release()
        if committed is None:
            return None
        answer((), self._listeners if committed else NO_LISTENERS, here=loop)
        return append

    def _begin_at_once(self) -> bool:
        """BEGIN IMMEDIATE on the writer connection, or False if that would wait: the busy
        handler's sleeps (1 ms and up) must never run on the event loop."""
        writer = self._writer
        try:
            # Left at 0 after: at one caller every commit comes here, and SQLite prepares
            # a PRAGMA's statement again each time it runs (a PRAGMA runs only once), so
            # setting it and back cost a CreateOrder about 28,000 instructions (callgrind,
            # on SQLite). Every BEGIN that may wait sets the store's own timeout first.
            if not self._waits_off:
                writer.execute("PRAGMA busy_timeout = 0")
                self._waits_off = True
            writer.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            self._rollback()
            return False
        return True

    def _let_writes_wait(self) -> None:
        """The writer's busy timeout back to the store's own (or to what is left of it,
        ``_lock_wait_from``), if a commit on the event loop left it at 0: before a BEGIN
        that may wait for another process's write lock. With ``_writing`` held."""
        if self._waits_off:
            self._writer.execute(self._busy_timeout_pragma)
            self._waits_off = False

    def _write_forever(self) -> None:
        try:
            stop = False
            while not stop:
                batch, stop = self._writes.take(self._max_batch)
                if not batch:
                    continue
                taken = time.monotonic()
                # ``_writing`` before the turn, as ``append`` takes them: the turn is a lock
                # on a descriptor that both share, which would not keep one from the other.
                with self._writing:
                    if self._turns is not None:
                        self._turns.take()
                        if not stop:
                            # Appends queued while another process wrote share this turn.
                            batch, stop = self._writes.take_more(batch, self._max_batch)
                    try:
                        with self._lock_wait_from(taken):
                            committed = self._write_or_fail(batch)
                    finally:
                        if self._turns is not None:
                            self._turns.release()
                answer(batch, self._listeners if committed else NO_LISTENERS)
                if not committed and not stop:
                    stop = self._refuse_queued_behind(batch)
        finally:
            with self._writing:
                self._writer.close()

    @contextlib.contextmanager
    def _lock_wait_from(self, taken: float) -> Iterator[None]:
        """The writer's busy timeout counted from ``taken``, when its batch was taken.

        Waiting for ``_writing`` (a snapshot's write waiting for the lock itself) or for
        this process's turn (another worker waiting out the lock) counts, so that an
        append waits about one busy timeout in all, not one for each. Shortened only
        once that wait is a tenth of the timeout: the two PRAGMAs are not worth running
        for the few milliseconds another writer's batch holds the lock.
        """
        waited = time.monotonic() - taken
        if waited < self._busy_timeout / 10:
            yield
            return
        left = max(0.0, self._busy_timeout - waited)
        self._writer.execute(_busy_timeout_pragma(left))
        self._waits_off = False
        try:
            yield
        finally:
            self._writer.execute(self._busy_timeout_pragma)

    def _refuse_queued_behind(self, batch: list[Append]) -> bool:
        """When ``batch`` failed for waiting out another process's write lock: refuse
        the appends queued while it waited, as it was refused, rather than let each
        batch of them start a busy wait of its own (they waited two busy timeouts and
        more). One that comes later waits for the lock afresh. Returns whether the
        writer must stop, having found the queue's end."""
        cause = _lock_timeout(batch[0].outcome)
        if cause is None:
            return False
        queued, stop = self._writes.take_more([], sys.maxsize)
        for append in queued:
            append.outcome = store_error("the SQLite transaction failed", cause)
        answer(queued)
        return stop

    def _write_or_fail(self, batch: list[Append], *, one_by_one: bool = True) -> bool | None:
        """``_write``, with every item failed if it raises: a bug must neither leave
        callers waiting forever nor a transaction open."""
        try:
            gone = self._gone()
        except OSError as e:
            # Nothing written while the files cannot be checked (a directory this user may
            # no longer search, an I/O error): refused, and the thread goes on.
            self._rollback()
            self._refuse(batch, f"{_unchecked(self._path, e)}; nothing is written meanwhile")
            return False
        if gone is not None:
            self._rollback()
            self._save_lost_wal()
            self._refuse_gone(batch, gone)
            return False
        try:
            committed = self._write(batch, one_by_one=one_by_one)
        except Exception as e:
            log.exception("SQLite writer failed")
            self._rollback()
            for append in batch:
                append.outcome = store_error("the SQLite store failed", e, self._path)
            return False
        if not committed:
            return committed
        try:
            gone = self._gone()
        except OSError as e:
            # SQLite committed the batch, and the files were there just before: answered
            # as committed (refused, a retry without its command_id would commit it
            # twice); the next batch's check refuses it while this lasts.
            log.warning("%s after a commit", _unchecked(self._path, e))
            return committed
        if gone is not None:
            # Deleted while this batch was written: its commits went into a file that is
            # gone when the store closes, and none of them is answered as committed;
            # unless the whole of a deleted -wal file, this batch with it, was copied
            # into the store's file, where they stand (refused, a retry without its
            # command_id would commit a command twice). The next batch is refused.
            self._save_lost_wal()
            if not self._wal_saved or self._deleted():
                self._refuse_gone(batch, gone)
                return False
        return committed

    @staticmethod
    def _refuse_gone(batch: Sequence[Call[Any, Any]], gone: str) -> None:
        SQLiteEventStore._refuse(batch, f"{gone}; nothing is committed to it any more")

    @staticmethod
    def _refuse(batch: Sequence[Call[Any, Any]], reason: str) -> None:
        for call in batch:
            call.outcome = StoreUnavailableError(reason)

    def _gone(self) -> str | None:
        """What was deleted of the store while it served, or None if nothing was.

        SQLite goes on writing to a deleted file, which is gone when the last connection
        closes, or when the process dies for a -wal file: commits would be acknowledged
        and then lost. The store's file is gone when it has no name left (deleted, or its
        directory removed): a file moved elsewhere keeps a name, and its commits, and
        goes on. Its -wal file is gone when the file of that name is not the one SQLite
        writes: deleted, or replaced by one that a connection opened since has created,
        which holds none of the commits. One ``fstat`` and one ``stat`` per batch.
        """
        if self._wal is None:
            return None
        # ``_deleted`` and ``_identity`` written out, and the -wal named by a str: this
        # runs before and after every commit, and so cost 2,300 instructions more each
        # time (callgrind). What is left is the two system calls' own (~12,000).
        file = self._file
        if file is not None and os.fstat(file).st_nlink == 0:
            return f"the SQLite store {self._path} was deleted while the gateway served it"
        try:
            found = os.stat(self._wal_name)
        except FileNotFoundError:
            identity = None
        else:
            identity = found.st_dev, found.st_ino
        if identity != self._wal_identity:
            return (
                f"the SQLite store {self._path} lost its {self._wal.name} file, deleted or"
                " replaced while the gateway served it"
            )
        return None

    def _deleted(self) -> bool:
        """Whether the store's file has no name left."""
        return self._file is not None and os.fstat(self._file).st_nlink == 0

    def _save_lost_wal(self) -> None:
        """Copy into the store's file what its deleted -wal file holds: the commits
        acknowledged since the last checkpoint, which only this process's descriptor
        still reaches, and which a crash would lose. Once, and only while no other file
        has taken the -wal's name: frames a connection wrote to such a file are not in
        this one, and copying them from here would damage the store."""
        try:
            if self._wal_saved or self._wal is None or self._wal.exists() or self._deleted():
                return
        except OSError as e:
            log.warning("%s: the deleted -wal is not copied", _unchecked(self._path, e))
            return
        try:
            # PASSIVE: no busy wait, which may run on the event loop (``_commit_here``).
            busy, frames, copied = self._writer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            log.exception("copying the deleted %s into %s failed", self._wal.name, self._path)
            return
        self._wal_saved = not busy and frames == copied
        log.warning(
            "copied %d of %d pages of the deleted %s into %s",
            copied,
            frames,
            self._wal.name,
            self._path,
        )

    def _write(self, batch: list[Append], *, one_by_one: bool = True) -> bool | None:
        """Commit what can be committed; every item of ``batch`` gets an outcome. Returns
        whether any of it committed.

        First as one batch decided in Python; when that declines, commit by commit in
        savepoints. There a driver error in one commit aborts the transaction: that
        commit fails, and the batch is written again without it, so that the others are
        unaffected. Without ``one_by_one``, a batch that declines is left as it was (no
        outcome, nothing written) and None returned.
        """
        committed = self._write_decided(batch)
        if committed is not None or not one_by_one:
            return committed
        remaining = batch
        while remaining:
            culprit = self._write_once(remaining)
            if culprit is None:
                break
            remaining = [append for append in remaining if append is not culprit]
        return any(isinstance(append.outcome, list) for append in batch)

    def _write_decided(self, batch: list[Append]) -> bool | None:
        """Write ``batch`` as ``sqlite_decide.decide`` judges it, with batch-level statements.

        At most four statements per batch besides BEGIN and COMMIT, instead of five per
        commit: one read of the head and the stream versions, one of the command ids
        already recorded (none if the server chose them all), one ``executemany`` per
        table. Returns whether any commit committed; or None, having written nothing,
        when the batch must go commit by commit instead: ``decide`` declined, or an
        insert failed all the same. The unique keys stay the safety net for a case the
        check missed; the driver may also refuse a value it cannot bind.
        Only the per-commit path can tell which commit is at fault, so no outcome ever
        rests on this path alone, except a fault of the file itself (full, I/O error),
        which would fail every commit alike.
        """
        cursor = self._cursor
        commits = [append.work for append in batch]
        try:
            if not self._writer.in_transaction:  # begun already by ``_commit_here``
                self._let_writes_wait()
                cursor.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            self._fail(batch, e)
            return False
        outcomes: list[list[RecordedEvent] | DomainError] = []
        try:
            head, versions, last_events = self._head_and_stream_heads(commits)
            # The command bus looks a client-chosen id up only once its command is
            # refused (``IdempotencyMiddleware``), so a client's retry of a committed
            # command reaches the writer: a duplicate decided in the batch, not a reason
            # to write the whole batch again commit by commit.
            stored_ids = self._recorded_commands(commits)
            decisions = decide(commits, versions, last_events, stored_ids)
            if decisions is None:
                self._rollback()
                return None
            commands: list[tuple[str, str, int, int]] = []
            rows: list[tuple[Any, ...]] = []
            # By index: ``zip(…, strict=True)`` parses its keyword argument on every call,
            # 1,500 instructions each time.
            for index, rejection in enumerate(decisions):
                if rejection is not None:
                    outcomes.append(rejection)
                    continue
                commit = commits[index]
                recorded, event_rows = _record(commit, head)
                commands.append((commit.command_id, commit.fingerprint, head + 1, len(recorded)))
                rows += event_rows
                outcomes.append(recorded)
                head += len(recorded)
            cursor.executemany(INSERT_COMMAND, commands)
            cursor.executemany(INSERT_EVENT, rows)
        except sqlite3.Error as e:
            if _is_fault(e):
                # A full disk fails every commit alike: no commit-by-commit retry.
                self._fail(batch, e)
                return False
            self._rollback()
            return None
        try:
            cursor.execute("COMMIT")
        except sqlite3.Error as e:
            self._fail(batch, e)
            return False
        for index, append in enumerate(batch):
            append.outcome = outcomes[index]
        return bool(commands)

    def _head_and_stream_heads(
        self, commits: list[Commit]
    ) -> tuple[int, dict[str, int], dict[str, str | None]]:
        """The head position, and the version (0: none) and last event id (None: none) of
        every stream ``commits`` name.

        Read under the write lock: no other connection can append until COMMIT, so all
        of it stays true for the whole batch.
        """
        head = 0
        versions: dict[str, int] = {}
        last_events: dict[str, str | None] = {}
        for streams, parameters in _lookups(stream_ids(commits), self._lookup_size):
            sql = head_and_stream_heads_sql(len(parameters))
            # fetchall: it runs the statement to its end, so that it does not stay open
            # (holding its read snapshot) on a cursor that outlives it.
            for n, version, event_id in self._cursor.execute(sql, parameters).fetchall():
                if n == 0:
                    head = version or 0
                elif n <= len(streams):  # not a repeat that pads the parameters
                    versions[streams[n - 1]] = version or 0
                    last_events[streams[n - 1]] = event_id
        return head, versions, last_events

    def _recorded_commands(self, commits: list[Commit]) -> set[str]:
        """Which of ``commits``' command ids the commands table holds; read under the write
        lock, like the heads.

        Ids the server chose are not looked up: drawn at random just now, none can be
        recorded (measured: 14,500 instructions less per CreateOrder in the writer thread
        without the statement). Should one be all the same, the commands table's primary
        key refuses it and the batch goes commit by commit, which finds the duplicate.
        """
        recorded: set[str] = set()
        named = [c.command_id for c in commits if not c.server_chose_id]
        if not named:
            # As for every command without a client's id: no chunks to make (3,300
            # instructions less per commit on the event loop, callgrind).
            return recorded
        for chunk, parameters in _lookups(named, self._lookup_size):
            if chunk:
                rows = self._cursor.execute(find_ranges_sql(len(parameters)), parameters)
                recorded.update(row[0] for row in rows.fetchall())
        return recorded

    def _fail(self, batch: list[Append], error: sqlite3.Error) -> None:
        """BEGIN, the head read or COMMIT failed: nothing in the batch is durable."""
        self._rollback()
        for append in batch:
            append.outcome = store_error("the SQLite transaction failed", error, self._path)

    def _write_once(self, batch: list[Append]) -> Append | None:
        connection = self._writer
        current: Append | None = None
        try:
            self._let_writes_wait()
            connection.execute("BEGIN IMMEDIATE")
            # Read under the write lock: no other connection can append until COMMIT.
            (head,) = connection.execute(HEAD).fetchone()
            for current in batch:
                connection.execute("SAVEPOINT a")
                current.outcome = self._insert(current.work, head)
                if isinstance(current.outcome, DomainError):
                    connection.execute("ROLLBACK TO a")
                else:
                    head += len(current.outcome)
                connection.execute("RELEASE a")
            current = None
            connection.execute("COMMIT")
        except sqlite3.Error as e:
            if current is None or _is_fault(e):
                self._fail(batch, e)
                return None
            self._rollback()
            current.outcome = store_error(f"append of {current.work.command_id} failed", e)
            return current
        return None

    def _insert(self, commit: Commit, head: int) -> list[RecordedEvent] | DomainError:
        """Write one commit at positions after ``head``, or say why it cannot be written."""
        connection = self._writer
        try:
            connection.execute(
                INSERT_COMMAND,
                (commit.command_id, commit.fingerprint, head + 1, len(commit.events)),
            )
        except sqlite3.IntegrityError as e:
            if e.sqlite_errorname != "SQLITE_CONSTRAINT_PRIMARYKEY":
                raise
            return DuplicateCommandError(commit.command_id)
        named = stream_ids([commit])
        if named:
            found = connection.execute(stream_heads_sql(len(named)), named + named).fetchone()
            versions = dict(zip(named, found[: len(named)], strict=True))
            last_events = dict(zip(named, found[len(named) :], strict=True))
            stale = conflict(commit, versions, last_events)
            if stale is not None:
                return stale
        recorded, rows = _record(commit, head)
        try:
            connection.executemany(INSERT_EVENT, rows)
        except sqlite3.IntegrityError as e:
            # The unique (stream_id, stream_version) key: versions that do not follow on
            # from the expected ones, or two events claiming one version.
            if e.sqlite_errorname != "SQLITE_CONSTRAINT_UNIQUE":
                raise
            return ConcurrencyConflictError(f"a stream version in {commit.command_id} is taken")
        return recorded

    def _rollback(self) -> None:
        if self._writer.in_transaction:
            try:
                self._writer.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("SQLite rollback failed")

    # -- reading --------------------------------------------------------------------

    def _read_forever(self, connection: sqlite3.Connection) -> None:
        try:
            stop = False
            while not stop:
                batch, stop = self._reads.take(READ_BATCH)
                for read in batch:
                    try:
                        read.outcome = read.work(connection)
                    except sqlite3.Error as e:
                        read.outcome = store_error(f"reading the SQLite store failed: {e}", e)
                    except Exception as e:  # a bug: the caller gets it as it is
                        read.outcome = e
                try:
                    gone = self._gone()
                except OSError as e:
                    self._refuse(batch, _unchecked(self._path, e))
                else:
                    if gone is not None:
                        # What was read may be commits refused for the deletion (the
                        # writer's check follows its write): a deleted store serves no
                        # reads either.
                        self._refuse_gone(batch, gone)
                answer(batch)
        finally:
            connection.close()

    def _read(self, query: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """``query`` queued for a reader thread, from a coroutine that awaits it."""
        future: asyncio.Future[T] = self._reads.submit(query)
        return future

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        # A SEARCH of the (stream_id, stream_version) index: the cost of reading a stream's
        # tail does not grow with the stream's length.
        def query(connection: sqlite3.Connection) -> list[RecordedEvent]:
            rows = connection.execute(READ_STREAM, (stream_id, after_version)).fetchall()
            return [_event(row) for row in rows]

        return await self._read(query)

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        # Safe to return everything committed: positions are assigned under SQLite's one
        # write lock, so nothing below a visible position can still commit (see above).
        def query(connection: sqlite3.Connection) -> list[RecordedEvent]:
            rows = connection.execute(READ_ALL, (after_position, limit)).fetchall()
            return [_event(row) for row in rows]

        return await self._read(query)

    async def read_all_rows(self, after_position: int = 0, limit: int = 1000) -> list[EventRow]:
        """``read_all`` as the rows SQLite returns (``server.stores.event_rows``): a catching-up
        subscription's reads, which build nothing per event in the reader thread."""

        def query(connection: sqlite3.Connection) -> list[EventRow]:
            try:
                rows: list[EventRow] = connection.execute(
                    READ_ALL, (after_position, limit)
                ).fetchall()
            except sqlite3.OperationalError as e:
                if not str(e).startswith(UNDECODABLE_TEXT):
                    raise
                raise _undecodable(connection, after_position, limit, str(e)) from e
            return rows

        return await self._read(query)

    async def read_stream_rows_after(
        self, stream_id: str, after_position: int, limit: int
    ) -> tuple[list[EventRow], int]:
        """``server.stores.event_rows.StreamRowReader``: one stream's rows, and the head of the
        same snapshot (both statements in one read transaction)."""

        def query(connection: sqlite3.Connection) -> tuple[list[EventRow], int]:
            connection.execute("BEGIN")
            try:
                rows: list[EventRow] = connection.execute(
                    READ_STREAM_AFTER, (stream_id, after_position, limit)
                ).fetchall()
                (head,) = connection.execute(HEAD).fetchone()
            finally:
                connection.execute("COMMIT")
            return rows, int(head)

        return await self._read(query)

    async def head_position(self) -> int:
        def query(connection: sqlite3.Connection) -> int:
            (head,) = connection.execute(HEAD).fetchone()
            return int(head)

        return await self._read(query)

    async def find_command(self, command_id: str) -> CommandRecord | None:
        def query(connection: sqlite3.Connection) -> CommandRecord | None:
            found = connection.execute(FIND_COMMAND, (command_id,)).fetchone()
            if found is None:
                return None
            fingerprint, first, count = found
            # A recorded command's events are committed and immutable: reading them in
            # a second statement cannot see anything but what the first one promised.
            rows = connection.execute(READ_RANGE, (first, first + count - 1)).fetchall()
            return CommandRecord(command_id, fingerprint, tuple(_event(row) for row in rows))

        return await self._read(query)

    async def find_command_ranges(self, command_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """``server.verify.CommandLog``: the positions each recorded command points at."""

        def query(connection: sqlite3.Connection) -> dict[str, tuple[int, int]]:
            found: dict[str, tuple[int, int]] = {}
            for chunk, params in _lookups(list(command_ids), self._lookup_size):
                if chunk:
                    rows = connection.execute(find_ranges_sql(len(params)), params).fetchall()
                    found.update((command_id, (first, count)) for command_id, first, count in rows)
            return found

        return await self._read(query)

    async def read_command_records(
        self, after_command_id: str, limit: int
    ) -> list[tuple[str, int, int, str]]:
        """``server.verify.CommandLog``: command records in command id order, their text
        decoded with ``surrogateescape`` (what is not UTF-8 stays as it was stored)."""

        def query(connection: sqlite3.Connection) -> list[tuple[str, int, int, str]]:
            after = after_command_id.encode("utf-8", "surrogateescape")
            rows = connection.execute(READ_RECORDS, (after, limit)).fetchall()
            return [
                (_text(command_id), first, count, _text(fingerprint))
                for command_id, first, count, fingerprint in rows
            ]

        return await self._read(query)

    async def repeated_event_ids(self, head: int, limit: int) -> list[tuple[str, list[int]]]:
        """``server.verify.CommandLog``: event ids that several events have."""

        def query(connection: sqlite3.Connection) -> list[tuple[str, list[int]]]:
            rows = connection.execute(REPEATED_EVENT_IDS, (head, limit)).fetchall()
            # group_concat follows no order of its own.
            return [(event_id, sorted(map(int, listed.split(",")))) for event_id, listed in rows]

        return await self._read(query)

    async def file_damage(self) -> list[str]:
        """``server.verify.FileCheck``: what SQLite's integrity check finds wrong with the
        file (its pages, indexes and constraints, every table's), empty if nothing."""

        return await self._read(file_problems)

    # -- snapshots --------------------------------------------------------------------

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        def query(connection: sqlite3.Connection) -> Snapshot | None:
            row = connection.execute(LOAD_SNAPSHOT, (stream_id,)).fetchone()
            return None if row is None else Snapshot(*row)

        return await self._read(query)

    async def load_snapshot_and_events(
        self, stream_id: str
    ) -> tuple[Snapshot | None, list[EventPayload]]:
        # Two statements, each its own read transaction: the events after a snapshot are
        # committed and never change, so a snapshot saved between the two does no harm.
        def query(connection: sqlite3.Connection) -> tuple[Snapshot | None, list[EventPayload]]:
            row = connection.execute(LOAD_SNAPSHOT, (stream_id,)).fetchone()
            snapshot = None if row is None else Snapshot(*row)
            after = 0 if snapshot is None else snapshot.stream_version
            rows: list[EventPayload] = connection.execute(
                READ_PAYLOADS, (stream_id, after)
            ).fetchall()
            return snapshot, rows

        return await self._read(query)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Written on a connection of its own, off the writer thread: appends never queue
        behind a snapshot, only (briefly) on SQLite's write lock."""

        def write() -> None:
            # ``_writing`` too: the appends then wait for the snapshot on this lock, woken
            # the moment it is written, rather than in SQLite's busy handler, which polls
            # in sleeps of 1 ms and more.
            # And a turn among the processes on the file, as the writer takes one: without
            # it, the snapshot and another worker's writer met at SQLite's lock, and the
            # one that lost slept in the busy handler, this process's appends queued on
            # ``_writing`` behind it (``--workers 2``, 32 callers each on a product of its
            # own: a thread of each worker was in snapshot writes a third of the time).
            with self._snapshot_lock, self._writing:
                if self._snapshot_writer is None:
                    raise StoreError("the SQLite store is closed")
                if self._turns is not None:
                    self._turns.take()
                try:
                    self._snapshot_writer.execute(
                        SAVE_SNAPSHOT,
                        (
                            snapshot.stream_id,
                            snapshot.stream_version,
                            snapshot.schema_version,
                            snapshot.data,
                        ),
                    )
                except sqlite3.Error as e:
                    raise store_error(f"saving a snapshot failed: {e}", e) from e
                finally:
                    if self._turns is not None:
                        self._turns.release()

        await asyncio.to_thread(write)

    # -- notification and shutdown --------------------------------------------------

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = self._loop
        with self._listeners_lock:
            listeners = dict(self._listeners)
            listeners[loop] = (*listeners.get(loop, ()), listener)
            self._listeners = listeners

    async def close(self) -> None:
        """Appends and reads already queued are finished first; new ones are refused."""
        self._writes.close(consumers=1)
        self._reads.close(consumers=len(self._threads) - 1)
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        # The turns too under the snapshot's lock: a snapshot being written holds its turn,
        # and one that comes later finds the store closed before it takes one.
        with self._snapshot_lock:
            if self._snapshot_writer is not None:
                self._snapshot_writer.close()
                self._snapshot_writer = None
            if self._turns is not None:
                self._turns.close()
                self._turns = None
        if self._file is not None:
            os.close(self._file)
            self._file = None


FileCheck = Literal["integrity_check", "quick_check"]


_DATABASE_HEADING = re.compile(r"\*\*\* in database \S+ \*\*\*")


def file_problems(
    connection: sqlite3.Connection, check: FileCheck = "integrity_check"
) -> list[str]:
    """What SQLite's ``check`` of the file finds wrong, empty if nothing: integrity_check
    looks at pages, indexes and constraints; quick_check at pages and records only, in
    less time."""
    found: list[str] = []
    try:
        for (problem,) in connection.execute(f"PRAGMA {check}"):
            # SQLite heads a database's page problems with "*** in database main ***",
            # which names no problem: it would be shown as the first one.
            found.extend(
                line for line in str(problem).splitlines() if not _DATABASE_HEADING.fullmatch(line)
            )
    except sqlite3.DatabaseError as e:
        # Some damage stops the check itself; what it found so far still counts.
        found.append(str(e))
    return [] if found == ["ok"] else found
