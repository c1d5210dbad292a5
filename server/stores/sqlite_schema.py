"""The SQLite event store's schema and its versioned migrations.

The version lives in ``PRAGMA user_version`` (the database header), which is written in
the same transaction as the DDL, so a migration is applied entirely or not at all. Every
migration runs under ``BEGIN IMMEDIATE``: when several processes open a new file at once,
one takes the write lock and migrates, the others wait on it (busy timeout) and then
find the version already current. Append new migrations at the end; never edit old ones.
"""

from __future__ import annotations

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
    """The file is another program's database: tables, and no gateway schema."""


def _tables(connection: sqlite3.Connection) -> list[str]:
    rows = connection.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " ORDER BY name"
    ).fetchall()
    return [str(name) for (name,) in rows]


def migrate(connection: sqlite3.Connection) -> int:
    """Bring the schema to ``LATEST_VERSION``; returns the version found before.

    ``connection`` must be in autocommit mode (``isolation_level=None``) with a busy
    timeout, so that ``BEGIN IMMEDIATE`` waits for a concurrent migrator.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        (found,) = connection.execute("PRAGMA user_version").fetchone()
        if found > LATEST_VERSION:
            raise SchemaTooNewError(
                f"schema version {found} is newer than this gateway's ({LATEST_VERSION})"
            )
        if found == 0 and (tables := _tables(connection)):
            # A mistyped path to another program's file: the gateway's tables added
            # beside its own would mix two programs' data in one file.
            listed = ", ".join(tables[:3]) + (", …" if len(tables) > 3 else "")
            raise ForeignDatabaseError(
                f"the file holds another program's tables ({listed}) and no gateway schema;"
                " the gateway keeps its log in a file of its own: name a new file"
            )
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
    return int(found)
