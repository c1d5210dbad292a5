"""The SQLite event store's schema and its versioned migrations.

The version lives in ``PRAGMA user_version`` (the database header), which is written in
the same transaction as the DDL, so a migration is applied entirely or not at all. Every
migration runs under ``BEGIN IMMEDIATE``: when several processes open a new file at once,
one takes the write lock and migrates, the others wait on it (busy timeout) and then
find the version already current. Append new migrations at the end; never edit old ones.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3

from domain.errors import StoreError

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the event log and the idempotency records.
    (
        # ``position`` is the rowid: the global commit order, assigned by the single writer.
        # Commit metadata is repeated on every event so that every read is one table scan
        # with no join; it costs some bytes per row and no extra statement per append.
        """
        CREATE TABLE events (
            position        INTEGER PRIMARY KEY,
            event_id        TEXT    NOT NULL,
            stream_id       TEXT    NOT NULL,
            stream_version  INTEGER NOT NULL,
            occurred_at_us  INTEGER NOT NULL,
            command_id      TEXT    NOT NULL,
            correlation_id  TEXT    NOT NULL,
            user_id         TEXT    NOT NULL,
            event_type      TEXT    NOT NULL,
            data            BLOB    NOT NULL
        )
        """,
        # Optimistic concurrency: two commits can never both write version N of a stream.
        # It is also the index ``read_stream(stream, after_version)`` searches, so loading
        # the tail of a stream costs the same at 10 events and at 100,000.
        "CREATE UNIQUE INDEX events_stream_version ON events (stream_id, stream_version)",
        # A command's events are contiguous positions (one writer assigns them in one
        # savepoint), so the record needs only the range to replay them.
        """
        CREATE TABLE commands (
            command_id      TEXT    PRIMARY KEY,
            fingerprint     TEXT    NOT NULL,
            first_position  INTEGER NOT NULL,
            event_count     INTEGER NOT NULL
        ) WITHOUT ROWID
        """,
    ),
    # 2: each event's payload schema version. Existing rows read as 1, the version every
    # event had before versions were recorded; adding a column with a constant default
    # rewrites no row.
    ("ALTER TABLE events ADD COLUMN schema_version INTEGER NOT NULL DEFAULT 1",),
    # 3: the latest snapshot of each long stream (``domain.snapshots``).
    (
        """
        CREATE TABLE snapshots (
            stream_id       TEXT    PRIMARY KEY,
            stream_version  INTEGER NOT NULL,
            schema_version  INTEGER NOT NULL,
            data            BLOB    NOT NULL
        ) WITHOUT ROWID
        """,
    ),
    # 4: consumer groups (server.consumer_groups.store_sqlite).
    (
        # ``settings`` is the effective settings as JSON; ``start_position`` resolves
        # start_from_end to the head when the group was created.
        """
        CREATE TABLE consumer_groups (
            name            TEXT    PRIMARY KEY,
            settings        TEXT    NOT NULL,
            created_at_us   INTEGER NOT NULL,
            start_position  INTEGER NOT NULL
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE consumer_group_checkpoints (
            group_name      TEXT    NOT NULL REFERENCES consumer_groups ON DELETE CASCADE,
            partition       INTEGER NOT NULL,
            position        INTEGER NOT NULL,
            PRIMARY KEY (group_name, partition)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE consumer_group_parked (
            group_name      TEXT    NOT NULL REFERENCES consumer_groups ON DELETE CASCADE,
            event_id        TEXT    NOT NULL,
            position        INTEGER NOT NULL,
            partition       INTEGER NOT NULL,
            reason          TEXT    NOT NULL,
            parked_at_us    INTEGER NOT NULL,
            replaying       INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (group_name, event_id)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX consumer_group_parked_age ON consumer_group_parked"
        " (group_name, replaying, parked_at_us, position)",
    ),
    # 5: the failed attempts of consumer groups' unsettled events, so that the count goes
    # on after a restart, whichever process delivers the event next. A row exists only
    # for an event that failed at least once and is not settled yet.
    (
        """
        CREATE TABLE consumer_group_attempts (
            group_name      TEXT    NOT NULL REFERENCES consumer_groups ON DELETE CASCADE,
            event_id        TEXT    NOT NULL,
            position        INTEGER NOT NULL,
            partition       INTEGER NOT NULL,
            attempts        INTEGER NOT NULL,
            PRIMARY KEY (group_name, event_id)
        ) WITHOUT ROWID
        """,
    ),
    # 6: when a failed event's next delivery may be made (the end of a nack's backoff),
    # so that the backoff holds whichever process delivers the event next, and after a
    # restart. 0: at once.
    ("ALTER TABLE consumer_group_attempts ADD COLUMN retry_at_us INTEGER NOT NULL DEFAULT 0",),
)

LATEST_VERSION = len(MIGRATIONS)


class SchemaTooNewError(StoreError):
    """The file was migrated by a newer gateway than this one."""


class SchemaTooOldError(StoreError):
    """A store opened only to be read has an older schema than this gateway's (reading
    never upgrades it)."""


def require_latest(connection: sqlite3.Connection) -> None:
    """Refuse a schema other than ``LATEST_VERSION``, changing nothing: a store opened
    only to be read (``verify``) is not upgraded, which on SQLite an older release could
    not undo."""
    (found,) = connection.execute("PRAGMA user_version").fetchone()
    if found > LATEST_VERSION:
        raise SchemaTooNewError(
            f"schema version {found} is newer than this gateway's ({LATEST_VERSION})"
        )
    if found < LATEST_VERSION:
        raise SchemaTooOldError(
            f"schema version {found} is older than this gateway's ({LATEST_VERSION}):"
            " verify it with the release that wrote it, or upgrade it first with"
            " `order-gateway migrate` (for good: older releases then refuse the file)"
        )


class ForeignDatabaseError(StoreError):
    """The file is not a gateway store: another program's database, or a store whose
    tables are not those its schema version has."""


@functools.cache
def _columns_at(version: int) -> dict[str, frozenset[str]]:
    """Each table's columns in a store at schema ``version``: the migrations up to it,
    run on an empty in-memory database, so that they cannot disagree with this list."""
    with contextlib.closing(sqlite3.connect(":memory:")) as reference:
        for statements in MIGRATIONS[:version]:
            for statement in statements:
                reference.execute(statement)
        return _columns(reference)


def _columns(connection: sqlite3.Connection) -> dict[str, frozenset[str]]:
    rows = connection.execute(
        "SELECT m.name, c.name FROM sqlite_master AS m, pragma_table_info(m.name) AS c"
        " WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'"
    ).fetchall()
    columns: dict[str, set[str]] = {}
    for table, column in rows:
        columns.setdefault(str(table), set()).add(str(column))
    return {table: frozenset(names) for table, names in columns.items()}


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")


def _refuse_unknown(connection: sqlite3.Connection, later_too: bool = False) -> int:
    """Raise unless the file is a new one or a gateway store that the migrations after
    its version can bring up to date; returns its version. ``later_too``: a later
    release's store is taken too, if it has every table and column of this release's
    (migrations only add), for a tool that copies it as it is (``backup``).

    Any other file is another program's (a mistyped path) or a damaged store: the
    gateway's tables added beside another program's would mix two programs' data in one
    file, and a store that lost a table would be served until its first write failed.
    """
    (found,) = connection.execute("PRAGMA user_version").fetchone()
    if found > LATEST_VERSION and not later_too:
        raise SchemaTooNewError(
            f"schema version {found} is newer than this gateway's ({LATEST_VERSION})"
        )
    present = _columns(connection)
    ours = _columns_at(LATEST_VERSION)
    if present and (found == 0 or not present.keys() & ours.keys()):
        raise ForeignDatabaseError(
            f"the file holds another program's tables ({_listed(sorted(present))}) and no"
            " gateway schema; the gateway keeps its log in a file of its own: name a new file"
        )
    expected = _columns_at(min(found, LATEST_VERSION))
    lacking = [table for table in sorted(expected) if table not in present] + [
        f"{table}.{column}"
        for table in sorted(expected.keys() & present.keys())
        for column in sorted(expected[table] - present[table])
    ]
    if lacking:
        raise ForeignDatabaseError(
            f"the file is marked schema version {found} (PRAGMA user_version) but lacks"
            f" tables or columns that version has ({_listed(lacking)}): a damaged store, or"
            " another program's file; restore the store from a backup, or name a new file"
        )
    if clashing := _added_later(present, found):
        raise ForeignDatabaseError(
            f"the file is marked schema version {found} (PRAGMA user_version) but"
            f" already holds tables or columns that later versions add ({_listed(clashing)}):"
            " a damaged store, or another program's file; restore the store from a backup,"
            " or name a new file"
        )
    return int(found)


def _added_later(present: dict[str, frozenset[str]], found: int) -> list[str]:
    """The tables and columns in ``present`` that the migrations after version ``found``
    add: creating or adding one that is already there would fail midway (a version
    lowered by hand, a store's tables copied into another program's file)."""
    expected = _columns_at(found)
    ours = _columns_at(LATEST_VERSION)
    tables = sorted(present.keys() & ours.keys() - expected.keys())
    columns = [
        f"{table}.{column}"
        for table in sorted(expected.keys() & present.keys())
        for column in sorted(present[table] & (ours.get(table, frozenset()) - expected[table]))
    ]
    return tables + columns


def check(connection: sqlite3.Connection, later_too: bool = False) -> None:
    """Refuse a file that ``migrate`` would refuse, reading it only: before anything is
    changed in it, such as its journal mode (for good) or files made beside it.
    ``later_too``: as ``_refuse_unknown``.

    ``migrate`` checks again under its write lock: another process may have migrated
    the file since. One read transaction, so that the version and the tables are read
    at one moment, not either side of another process's migration.
    """
    connection.execute("BEGIN")
    try:
        _refuse_unknown(connection, later_too)
    finally:
        # SQLite has already rolled back after some errors (a full disk, an I/O error).
        if connection.in_transaction:
            connection.execute("ROLLBACK")


def migrate(connection: sqlite3.Connection) -> int:
    """Bring the schema to ``LATEST_VERSION``; returns the version found before.

    ``connection`` must be in autocommit mode (``isolation_level=None``) with a busy
    timeout, so that ``BEGIN IMMEDIATE`` waits for a concurrent migrator.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        found = _refuse_unknown(connection)
        for version in range(found + 1, LATEST_VERSION + 1):
            for statement in MIGRATIONS[version - 1]:
                connection.execute(statement)
            # PRAGMA takes no parameters; ``version`` is an int from this module.
            connection.execute(f"PRAGMA user_version = {version:d}")
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    return found
