"""Translates psycopg's exceptions into the domain's store errors, at the store boundary.

Nothing of the driver may travel further up: callers see ``ConcurrencyConflictError`` or
``DuplicateCommandError`` for a lost race, ``StoreFullError`` when the database is out of
disk space, ``StoreUnavailableError`` when PostgreSQL cannot be reached or is shedding
load (worth retrying), and ``StoreError`` for anything else, always chained (``from``) to
the driver's exception so that logs keep the cause. Messages never include SQL text or
parameter values.
"""

from __future__ import annotations

from psycopg import Error, OperationalError
from psycopg.errors import UniqueViolation
from psycopg_pool import PoolTimeout, TooManyRequests

from domain.errors import (
    ConcurrencyConflictError,
    DomainError,
    DuplicateCommandError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)
from domain.ports import Commit

COMMANDS_KEY = "commands_pkey"
STREAM_VERSION_KEY = "events_stream_version_key"
POSITION_KEY = "events_pkey"

DISK_FULL = "53100"
INSUFFICIENT_PRIVILEGE = "42501"
_UNAVAILABLE = ("08", "53", "57", "58030", "25006", "55P03")
"""SQLSTATEs (classes or codes) meaning "not now": connection exception; insufficient
resources (too many connections, out of memory; disk full is told apart first); operator
intervention (admin or crash shutdown, cannot connect now, statement timeout); an I/O
error; a read-only transaction, which is what a standby answers a write with when a
failover pointed the gateway at it; and a lock not had within a ``lock_timeout`` set on
the database or role (as a ``statement_timeout`` is, above: the wait, not the work, failed)."""


def is_full(error: Error) -> bool:
    """True if the database ran out of disk space (the statement committed nothing)."""
    return error.sqlstate == DISK_FULL


def is_rolled_back(error: Error) -> bool:
    """True if the server rolled the transaction back (SQLSTATE class 40: a deadlock's
    victim, a serialization failure). Told by the class, not the exception's type:
    psycopg raises DeadlockDetected and SerializationFailure as OperationalErrors, not as
    TransactionRollbacks."""
    return error.sqlstate is not None and error.sqlstate.startswith("40")


def is_unavailable(error: Error) -> bool:
    """True if the database could not be reached or refused the work for now."""
    if isinstance(error, PoolTimeout | TooManyRequests):
        return True
    if error.sqlstate is None:
        # psycopg reports failures before or below the protocol (refused, broken or closed
        # connections) as OperationalError without a SQLSTATE.
        return isinstance(error, OperationalError)
    return not is_full(error) and error.sqlstate.startswith(_UNAVAILABLE)


def store_error(error: Error, operation: str) -> StoreError:
    """The store error to raise ``from error`` after ``operation`` failed."""
    if is_full(error):
        # The message names the file the server could not extend: for the operator.
        return StoreFullError(
            f"PostgreSQL is out of disk space ({operation}): {error.diag.message_primary}"
        )
    if is_rolled_back(error):
        # A deadlock's victim or a serialization failure: its transaction wrote nothing,
        # and the same work may well pass if tried again (an append's is a lost race,
        # told apart before: ``append_error``).
        return StoreUnavailableError(
            f"PostgreSQL rolled back the transaction ({operation}): "
            f"{error.diag.message_primary or type(error).__name__}"
        )
    if is_unavailable(error):
        # Connection messages name the host and port, which is what an operator needs.
        reason = error.diag.message_primary or one_line(str(error))
        return StoreUnavailableError(f"PostgreSQL is unavailable ({operation}): {reason}")
    if error.sqlstate == INSUFFICIENT_PRIVILEGE:
        # The operator's to fix, by a grant: the message names the table or function.
        return StoreError(
            f"PostgreSQL {operation} not permitted: {error.diag.message_primary}"
            "; see docs/operations.md, Privileges"
        )
    return StoreError(
        f"PostgreSQL {operation} failed: SQLSTATE {error.sqlstate} "
        f"{error.diag.message_primary or type(error).__name__}"
    )


def one_line(message: str) -> str:
    """libpq's message on one line, as every error the command line prints is: a failed
    connection adds a hint on a line of its own ("\tIs the server running…"), and psycopg
    lists each host it tried on one more. A line that ends a sentence or introduces the
    next needs no separator but a space."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    joined = "".join(line + (" " if line.endswith((".", "?", ":")) else "; ") for line in lines)
    return joined.rstrip("; ")


def append_error(error: Error, commit: Commit) -> DomainError | StoreError:
    """The error to raise ``from error`` when appending ``commit`` failed.

    ``og_append`` reports duplicates and conflicts as results, not errors; the unique keys
    are the backstop that turns anything slipping past it into the same outcomes.
    """
    if isinstance(error, UniqueViolation):
        constraint = error.diag.constraint_name
        if constraint == COMMANDS_KEY:
            return DuplicateCommandError(commit.command_id)
        if constraint in (STREAM_VERSION_KEY, POSITION_KEY):
            return ConcurrencyConflictError(f"a stream of command {commit.command_id} moved on")
    if is_rolled_back(error):
        # Serialization failure or deadlock: nothing was written, a retry is safe.
        return ConcurrencyConflictError(f"command {commit.command_id} lost a race")
    return store_error(error, "append")
