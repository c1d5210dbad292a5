"""Storage faults answer clearly: a full store is RESOURCE_EXHAUSTED (STORE_FULL), one that
cannot be reached UNAVAILABLE (STORE_UNAVAILABLE), and the log says so once per fault."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from orders.v1 import events_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge
from psycopg.pq import DiagnosticField
from psycopg_pool import PoolTimeout

from domain.errors import (
    ConcurrencyConflictError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)
from domain.ports import CommandRecord, Commit, NewEvent, RecordedEvent, StreamLocked
from server.app import Gateway
from server.cli import main
from server.observability.store_faults import RECOVERY_QUIET, StoreFaults
from server.stores.postgres_errors import append_error
from server.stores.postgres_errors import store_error as postgres_store_error
from server.stores.sqlite import SQLiteEventStore
from server.stores.sqlite_errors import store_error as sqlite_store_error
from tests.clients import Clients, detail, item, order_request
from tests.conformance.contract import commit_of
from tests.subscription_support import StreamReader, WrappedStore, connect, running_gateway

FAULT_LINE = "event store fault"
RECOVERY_LINE = "event store works again"


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    info: error_details_pb2.ErrorInfo = detail(error, error_details_pb2.ErrorInfo)
    return info


# -- the fault log and metrics, on their own -----------------------------------------


class Faults:
    def __init__(self) -> None:
        registry = CollectorRegistry()
        self.now = 100.0
        self.errors = Counter("errors", "", ("kind",), registry=registry)
        self.fault = Gauge("fault", "", ("kind",), registry=registry)
        self.faults = StoreFaults(self.errors, self.fault, clock=lambda: self.now)
        self._registry = registry

    def value(self, name: str, kind: str) -> float:
        found = self._registry.get_sample_value(name, {"kind": kind})
        return found or 0.0


def full() -> StoreError:
    error = StoreFullError("the SQLite transaction failed")
    error.__cause__ = sqlite3.OperationalError("database or disk is full")
    return error


def test_a_fault_is_logged_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watched = Faults()
    with caplog.at_level(logging.INFO, logger="order_gateway"):
        watched.faults.succeeded(write=True)
        for _ in range(50):
            watched.faults.failed(full(), write=True)
        watched.now += 12.5
        watched.faults.succeeded(write=True)
        watched.faults.succeeded(write=True)

    (started,) = lines(caplog, FAULT_LINE)
    assert started.levelno == logging.ERROR
    assert "STORE_FULL" in started.getMessage()
    assert "database or disk is full" in started.getMessage()
    assert started.exc_info is None
    (ended,) = lines(caplog, RECOVERY_LINE)
    assert ended.levelno == logging.WARNING
    assert "after 12.5 s of STORE_FULL" in ended.getMessage()
    assert "50 store calls failed meanwhile" in ended.getMessage()
    assert len(caplog.records) == 2
    assert watched.value("errors_total", "full") == 50
    assert watched.value("fault", "full") == 0


def test_reads_that_work_do_not_end_a_fault_that_writes_ran_into(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watched = Faults()
    with caplog.at_level(logging.INFO, logger="order_gateway"):
        for _ in range(3):
            # A full disk: each command's reads work, its append fails.
            watched.faults.succeeded(write=False)
            watched.faults.failed(full(), write=True)
        assert watched.value("fault", "full") == 1
        watched.now += RECOVERY_QUIET
        watched.faults.succeeded(write=False)
        assert watched.faults.kind == "full"
        watched.faults.succeeded(write=True)
    assert len(lines(caplog, FAULT_LINE)) == 1
    assert len(lines(caplog, RECOVERY_LINE)) == 1
    assert watched.faults.kind is None


def test_a_read_ends_a_fault_that_only_reads_ran_into(caplog: pytest.LogCaptureFixture) -> None:
    watched = Faults()
    with caplog.at_level(logging.INFO, logger="order_gateway"):
        watched.faults.failed(StoreUnavailableError("connection refused"), write=False)
        watched.now += RECOVERY_QUIET
        watched.faults.succeeded(write=False)
    (ended,) = lines(caplog, RECOVERY_LINE)
    assert "STORE_UNAVAILABLE" in ended.getMessage()
    assert "1 store call failed" in ended.getMessage()
    assert watched.value("errors_total", "unavailable") == 1


def test_a_store_that_fails_some_calls_and_not_others_is_in_one_fault(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A disk with room for small commits only: failures and successes interleave."""
    watched = Faults()
    with caplog.at_level(logging.INFO, logger="order_gateway"):
        for _ in range(1000):
            watched.faults.failed(full(), write=True)
            watched.now += 0.01
            watched.faults.succeeded(write=True)
        assert watched.faults.kind == "full"
        assert watched.value("fault", "full") == 1
        watched.now += RECOVERY_QUIET
        watched.faults.succeeded(write=True)
    assert len(lines(caplog, FAULT_LINE)) == 1
    (ended,) = lines(caplog, RECOVERY_LINE)
    assert "1000 store calls failed meanwhile" in ended.getMessage()
    assert watched.faults.kind is None


async def test_a_fault_ends_when_the_store_worked_and_no_call_failed_after_even_if_none_comes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The first call that worked came within the quiet period of the last failure, and no
    # call came after it: the fault (and its gauge, which alerts read) stayed on for good
    # on a healthy, idle gateway.
    registry = CollectorRegistry()
    fault = Gauge("fault", "", ("kind",), registry=registry)
    faults = StoreFaults(
        Counter("errors", "", ("kind",), registry=registry), fault, recovery_quiet=0.2
    )
    with caplog.at_level(logging.INFO, logger="order_gateway"):
        faults.failed(StoreUnavailableError("connection refused"), write=True)
        faults.succeeded(write=True)
        assert registry.get_sample_value("fault", {"kind": "unavailable"}) == 1
        await asyncio.sleep(0.4)
    assert registry.get_sample_value("fault", {"kind": "unavailable"}) == 0
    assert faults.kind is None
    (ended,) = lines(caplog, RECOVERY_LINE)
    assert "after 0.0 s of STORE_UNAVAILABLE" in ended.getMessage()


async def test_a_failure_after_the_call_that_worked_keeps_the_fault_on() -> None:
    registry = CollectorRegistry()
    fault = Gauge("fault", "", ("kind",), registry=registry)
    faults = StoreFaults(
        Counter("errors", "", ("kind",), registry=registry), fault, recovery_quiet=0.2
    )
    faults.failed(StoreUnavailableError("connection refused"), write=True)
    faults.succeeded(write=True)
    await asyncio.sleep(0.1)
    faults.failed(StoreUnavailableError("connection refused"), write=True)
    await asyncio.sleep(0.4)
    assert faults.kind == "unavailable"
    assert registry.get_sample_value("fault", {"kind": "unavailable"}) == 1


def test_other_store_errors_are_counted_but_are_no_fault(caplog: pytest.LogCaptureFixture) -> None:
    watched = Faults()
    with caplog.at_level(logging.INFO, logger="order_gateway"):
        watched.faults.failed(StoreError("a bug"), write=True)
    assert watched.faults.kind is None
    assert caplog.records == []
    assert watched.value("errors_total", "other") == 1


# -- driver errors, translated at the store boundary ---------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("SQLITE_FULL", StoreFullError),
        ("SQLITE_IOERR", StoreUnavailableError),
        ("SQLITE_IOERR_FSYNC", StoreUnavailableError),
        ("SQLITE_CANTOPEN", StoreUnavailableError),
        ("SQLITE_BUSY", StoreUnavailableError),
        ("SQLITE_CORRUPT", StoreError),
        ("SQLITE_READONLY", StoreUnavailableError),
        ("SQLITE_READONLY_DBMOVED", StoreUnavailableError),
    ],
)
def test_sqlite_result_codes_map_to_store_errors(code: str, expected: type[StoreError]) -> None:
    cause = sqlite3.OperationalError("the driver's message")
    cause.sqlite_errorname = code
    error = sqlite_store_error("the SQLite transaction failed", cause)
    assert type(error) is expected
    assert error.__cause__ is cause


@pytest.mark.parametrize(
    ("sqlstate", "expected"),
    [
        ("53100", StoreFullError),  # disk_full
        ("08006", StoreUnavailableError),  # connection_failure
        ("57P01", StoreUnavailableError),  # admin_shutdown
        ("57P03", StoreUnavailableError),  # cannot_connect_now
        ("53300", StoreUnavailableError),  # too_many_connections
        ("58030", StoreUnavailableError),  # io_error
        ("25006", StoreUnavailableError),  # read_only_sql_transaction: a standby
        ("40P01", StoreUnavailableError),  # deadlock_detected: rolled back, retryable
        ("40001", StoreUnavailableError),  # serialization_failure
        ("55P03", StoreUnavailableError),  # lock_not_available: a role's lock_timeout
        ("42P01", StoreError),  # undefined_table
        ("22003", StoreError),  # numeric_value_out_of_range
    ],
)
def test_postgres_sqlstates_map_to_store_errors(sqlstate: str, expected: type[StoreError]) -> None:
    error = postgres_store_error(psycopg.errors.lookup(sqlstate)("the server's message"), "append")
    assert type(error) is expected


@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])
def test_an_append_the_server_rolled_back_is_a_lost_race(sqlstate: str) -> None:
    # A deadlock's victim or a serialization failure: nothing was written, and the bus
    # retries a conflict (it answered INTERNAL: psycopg raises these as
    # OperationalErrors, not as the TransactionRollback the code looked for).
    cause = psycopg.errors.lookup(sqlstate)("the server's message")
    assert isinstance(append_error(cause, new_commit()), ConcurrencyConflictError)


def server_error(sqlstate: str, message: str, more: str) -> psycopg.Error:
    """A psycopg error as the server sends it: its text the message and ``more`` lines."""
    info: dict[int, bytes | None] = {DiagnosticField.MESSAGE_PRIMARY: message.encode()}
    error: psycopg.Error = psycopg.errors.lookup(sqlstate)(f"{message}\n{more}", info=info)
    return error


@pytest.mark.parametrize(
    ("sqlstate", "message", "more"),
    [
        (
            "25006",
            "cannot execute INSERT in a read-only transaction",
            'CONTEXT:  SQL statement "INSERT INTO events VALUES (1)"\n'
            "PL/pgSQL function og_append(text) line 9 at SQL statement",
        ),
        (
            "53100",
            'could not extend file "base/16384/16390": No space left on device',
            "HINT:  Check free disk space.",
        ),
    ],
)
def test_a_postgres_fault_line_states_the_servers_message_once(
    sqlstate: str, message: str, more: str, caplog: pytest.LogCaptureFixture
) -> None:
    watched = Faults()
    cause = server_error(sqlstate, message, more)
    error = postgres_store_error(cause, "append")
    error.__cause__ = cause  # as the store raises it
    with caplog.at_level(logging.INFO, logger="order_gateway"):
        watched.faults.failed(error, write=True)
    [fault] = lines(caplog, FAULT_LINE)
    assert fault.getMessage().count(message) == 1
    assert "CONTEXT" not in fault.getMessage()


def test_a_postgres_pool_timeout_is_unavailable() -> None:
    error = postgres_store_error(PoolTimeout("couldn't get a connection after 10.00 sec"), "read")
    assert type(error) is StoreUnavailableError
    assert "couldn't get a connection" in str(error)


# -- a full SQLite store, over gRPC ---------------------------------------------------


def limit_pages(store: SQLiteEventStore, pages: int | None) -> None:
    """Make the store's file unable to grow beyond its current size (None: lift that).

    ``max_page_count`` belongs to the connection, so it is set on the writer's, between
    calls (the writer thread is idle then). Nothing else needs a full disk to be mounted.
    """
    writer: sqlite3.Connection = store._writer
    if pages is None:
        writer.execute("PRAGMA max_page_count = 1073741823")
    else:
        writer.execute(f"PRAGMA max_page_count = {pages:d}")


def page_count(store: SQLiteEventStore) -> int:
    (count,) = store._writer.execute("PRAGMA page_count").fetchone()
    return int(count)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteEventStore]:
    store = await SQLiteEventStore.open(tmp_path / "events.db")
    yield store
    await store.close()


@pytest.fixture
async def sqlite_gateway(sqlite_store: SQLiteEventStore) -> AsyncIterator[Gateway]:
    async with running_gateway(sqlite_store) as gateway:
        yield gateway


async def restock_until_full(clients: Clients, product_id: str) -> tuple[int, grpc.aio.AioRpcError]:
    """Restock one unit at a time until the store refuses; the units acknowledged."""
    for acknowledged in range(10_000):
        try:
            await clients.restock(product_id, 1)
        except grpc.aio.AioRpcError as error:
            return acknowledged, error
    raise AssertionError("the store never filled up")


async def test_a_full_store_is_resource_exhausted_store_full_and_recovers(
    sqlite_store: SQLiteEventStore,
    sqlite_gateway: Gateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with connect(sqlite_gateway) as clients:
        await clients.restock("sku-1", 100)
        limit_pages(sqlite_store, page_count(sqlite_store))
        with caplog.at_level(logging.INFO, logger="order_gateway"):
            acknowledged, refused = await restock_until_full(clients, "sku-1")

            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = error_info(refused)
            assert (info.reason, info.domain) == ("STORE_FULL", "order-gateway")
            assert "nothing was committed" in (refused.details() or "")
            # Every call while full is refused the same way, commands of several events too.
            order = order_request(item("sku-1", 2), command_id=str(uuid.uuid4()))
            for _ in range(20):
                with pytest.raises(grpc.aio.AioRpcError) as again:
                    await clients.create(order)
                assert again.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error_info(again.value).reason == "STORE_FULL"

            assert len(lines(caplog, FAULT_LINE)) == 1
            assert not any(r.exc_info for r in caplog.records)
            assert "Traceback" not in caplog.text

            limit_pages(sqlite_store, None)
            created = await clients.create(order)
            assert lines(caplog, RECOVERY_LINE) == [], "not before a quiet second"
            await asyncio.sleep(RECOVERY_QUIET)
            await clients.restock("sku-1", 1)
            (ended,) = lines(caplog, RECOVERY_LINE)
            assert "21 store calls failed meanwhile" in ended.getMessage()

    # Nothing half-committed: the refused order left no event, and once retried it has
    # all of them; the stock adds up to what was acknowledged.
    events = await sqlite_store.read_all(0, 100_000)
    assert [e.position for e in events] == list(range(1, len(events) + 1))
    order_events = [e for e in events if e.command_id == order.command_id]
    assert [e.event_type for e in order_events] == ["OrderCreated", "StockReserved"]
    assert [e.event_type for e in created] == ["OrderCreated", "StockReserved"]
    reserved = created[1].stock_reserved
    assert reserved.available_after == 100 + acknowledged - 2
    restocks = [e for e in events if e.event_type == "ProductRestocked"]
    assert len(restocks) == 1 + acknowledged + 1  # the one after the quiet second


async def test_a_full_store_is_counted_in_the_metrics(
    sqlite_store: SQLiteEventStore, sqlite_gateway: Gateway
) -> None:
    async with connect(sqlite_gateway) as clients:
        limit_pages(sqlite_store, page_count(sqlite_store))
        await restock_until_full(clients, "sku-1")
        registry = sqlite_gateway.metrics.registry
        assert registry.get_sample_value("order_gateway_store_fault", {"kind": "full"}) == 1
        assert registry.get_sample_value("order_gateway_store_errors_total", {"kind": "full"}) == 1
        limit_pages(sqlite_store, None)
        await asyncio.sleep(RECOVERY_QUIET)
        await clients.restock("sku-1", 1)
        assert registry.get_sample_value("order_gateway_store_fault", {"kind": "full"}) == 0


# -- a store that cannot be reached ---------------------------------------------------


class UnreachableStore(WrappedStore):
    """A memory store that can be made unreachable, as a stopped database is."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailableError("connection refused")

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        self._check()
        return await super().append(commit)

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        self._check()
        return await super().read_stream(stream_id, after_version)

    async def find_command(self, command_id: str) -> CommandRecord | None:
        self._check()
        return await super().find_command(command_id)

    async def head_position(self) -> int:
        self._check()
        return await super().head_position()

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        self._check()
        return await super().read_all(after_position, limit)


async def test_an_unreachable_store_is_unavailable_on_commands_and_on_subscribe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = UnreachableStore()
    async with running_gateway(store) as gateway, connect(gateway) as clients:
        await clients.restock("sku-1", 1)
        store.down = True
        with caplog.at_level(logging.INFO, logger="order_gateway"):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await clients.restock("sku-1", 1, command_id=str(uuid.uuid4()))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            info = error_info(refused.value)
            assert (info.reason, info.domain) == ("STORE_UNAVAILABLE", "order-gateway")
            assert "retrying with the same command_id is safe" in (refused.value.details() or "")

            reader = StreamReader.open(clients)
            with pytest.raises(grpc.aio.AioRpcError) as subscribe_refused:
                await reader.next()
            assert subscribe_refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(subscribe_refused.value).reason == "STORE_UNAVAILABLE"
            # A subscription has no command_id to retry with.
            assert (
                subscribe_refused.value.details()
                == "the event store cannot be reached; retry later"
            )
            # Health follows the process, not its store: replicas sharing a database
            # stay in their load balancer and answer the fault themselves.
            assert await health_of(gateway) == health_pb2.HealthCheckResponse.SERVING

            store.down = False
            await asyncio.sleep(RECOVERY_QUIET)
            restocked: list[events_pb2.Event] = await clients.restock("sku-1", 1)
        assert restocked[0].product_restocked.available_after == 2
        assert len(lines(caplog, FAULT_LINE)) == 1
        assert len(lines(caplog, RECOVERY_LINE)) == 1
        assert "Traceback" not in caplog.text


async def health_of(gateway: Gateway) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        reply: health_pb2.HealthCheckResponse = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="orders.v1.OrderCommandService"), timeout=10
        )
    return int(reply.status)


class UnreachableSharedLocksStore(UnreachableStore):
    """The same, with the per-stream locks that replicas sharing a database take turns by
    (``SharedStreamLocks``), which go away with it."""

    def __init__(self) -> None:
        super().__init__()
        self.contention_listeners: list[Callable[[str], None]] = []

    async def lock_stream(self, stream_id: str, after_version: int | None = None) -> StreamLocked:
        self._check()
        return StreamLocked(False, [] if after_version is not None else None)

    async def unlock_stream(self, stream_id: str) -> None:
        self._check()

    async def announce_contention(self, stream_id: str) -> None:
        self._check()

    def add_contention_listener(self, listener: Callable[[str], None]) -> None:
        self.contention_listeners.append(listener)


async def test_a_refusal_while_taking_a_turn_at_a_contended_stream_is_a_store_fault(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = UnreachableSharedLocksStore()
    async with running_gateway(store) as gateway, connect(gateway) as clients:
        await clients.restock("hot", 10)
        # Another replica says it takes turns at the product: this one's next command
        # on it takes the shared lock first, the store call that meets the outage.
        for listener in store.contention_listeners:
            listener("product-hot")
        store.down = True
        with (
            caplog.at_level(logging.INFO, logger="order_gateway"),
            pytest.raises(grpc.aio.AioRpcError) as refused,
        ):
            await clients.restock("hot", 1, command_id=str(uuid.uuid4()))
        registry = gateway.metrics.registry
        errors = registry.get_sample_value(
            "order_gateway_store_errors_total", {"kind": "unavailable"}
        )
        fault = registry.get_sample_value("order_gateway_store_fault", {"kind": "unavailable"})

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(refused.value).reason == "STORE_UNAVAILABLE"
    assert errors == 1
    assert fault == 1
    assert len(lines(caplog, FAULT_LINE)) == 1


# -- a SQLite file that cannot be written, or that was deleted -----------------------

DROP_FILE_PRIVILEGES = (
    "setpriv",
    "--bounding-set",
    "-dac_override,-dac_read_search,-fowner",
    "--inh-caps",
    "-dac_override,-dac_read_search,-fowner",
    "--",
)
"""As root, file modes bind only without these capabilities."""


def unprivileged(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("root, and no setpriv to drop the privilege that ignores file modes")
    return [*DROP_FILE_PRIVILEGES, *command]


def test_a_store_file_that_cannot_be_written_is_refused_at_start_and_still_verified(
    tmp_path: Path,
) -> None:
    store = tmp_path / "events.db"
    url = f"sqlite:///{store}"
    gateway = [sys.executable, "-m", "server.cli"]
    subprocess.run([*gateway, "migrate", "--store", url], check=True, capture_output=True)
    store.chmod(0o444)
    tmp_path.chmod(0o755)

    for command in (["serve", "--listen", "127.0.0.1:0"], ["migrate"]):
        refused = subprocess.run(
            unprivileged([*gateway, *command, "--store", url]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 1, refused.stderr
        assert "readonly database" in refused.stderr
        assert "Traceback" not in refused.stderr
        # Nothing made beside it: a -wal and -shm of this user's would lock out the owner.
        assert sorted(p.name for p in tmp_path.iterdir()) == ["events.db"]
    verified = subprocess.run(
        unprivileged([*gateway, "verify", "--store", url]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0, verified.stderr
    assert "OK: the log is consistent" in verified.stdout


GATEWAY_UID = 1001
"""The store's owner in the test below: the gateway's user."""
OTHER_UID = 1002
"""Another user, who may read the store."""


def as_user(uid: int, command: list[str]) -> list[str]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a command as other users")
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *command]


GATEWAY = [sys.executable, "-m", "server.cli"]


def run_as(uid: int, command: list[str]) -> subprocess.CompletedProcess[str]:
    """``command`` run to its end as the user ``uid``, its output captured as text."""
    return subprocess.run(as_user(uid, command), capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def the_gateway_users_store(folder_mode: int) -> Iterator[tuple[Path, str]]:
    """A store of the gateway's user (``GATEWAY_UID``) in a new folder every user can
    reach (pytest's own is root's alone), with ``folder_mode``: the folder and the URL."""
    with tempfile.TemporaryDirectory(prefix="og-users-", dir="/tmp") as scratch:
        folder = Path(scratch)
        url = f"sqlite:///{folder / 'events.db'}"
        subprocess.run([*GATEWAY, "migrate", "--store", url], check=True, capture_output=True)
        os.chown(folder / "events.db", GATEWAY_UID, GATEWAY_UID)
        folder.chmod(folder_mode)
        yield folder, url


@pytest.mark.parametrize(
    ("command", "refusal"),
    [
        ("verify", "run this as the store's owner or as root"),
        ("backup", "run this as the store's owner or as root"),
        # May not write it: refused, as SQLite refuses it, but before SQLite made files.
        ("migrate", "attempt to write a readonly database"),
        ("serve", "attempt to write a readonly database"),
    ],
)
def test_another_user_reading_a_stopped_store_leaves_nothing_its_owner_cannot_use(
    command: str, refusal: str
) -> None:
    # The store the gateway's, as a deployment has it; another user may read it.
    with the_gateway_users_store(folder_mode=0o777) as (folder, url):
        arguments = [*GATEWAY, command, "--store", url]
        if command == "backup":
            arguments.append(str(folder / "copy.db"))
        if command == "serve":
            arguments += ["--listen", "127.0.0.1:0"]
        read = run_as(OTHER_UID, arguments)
        assert read.returncode == 1, read.stdout + read.stderr
        assert refusal in read.stderr
        assert "Traceback" not in read.stderr
        assert sorted(p.name for p in folder.iterdir()) == ["events.db"]
        served = run_as(GATEWAY_UID, [*GATEWAY, "migrate", "--store", url])
        assert served.returncode == 0, served.stderr


def test_another_user_verifies_a_store_where_it_can_make_no_file() -> None:
    # A folder only its owner may write: SQLite can leave nothing of this user's there,
    # and reads the store as immutable (it was refused for what it could not leave).
    with the_gateway_users_store(folder_mode=0o755) as (folder, url):
        verified = run_as(OTHER_UID, [*GATEWAY, "verify", "--store", url])
        assert verified.returncode == 0, verified.stderr
        assert "OK: the log is consistent" in verified.stdout
        assert sorted(p.name for p in folder.iterdir()) == ["events.db"]


def test_a_backup_into_a_folder_it_may_not_read_is_refused_with_nothing_written() -> None:
    # Its name could not be synced there: the copy used to be left in place, and the
    # backup reported as failed.
    with the_gateway_users_store(folder_mode=0o755) as (folder, url):
        drop = folder / "drop"
        drop.mkdir(mode=0o333)
        drop.chmod(0o333)
        backup = run_as(GATEWAY_UID, [*GATEWAY, "backup", "--store", url, str(drop / "copy.db")])
        assert backup.returncode == 1, backup.stdout + backup.stderr
        assert (
            f"cannot back up to {drop / 'copy.db'}: its directory {drop} cannot be opened to"
            " sync the copy's name into it (Permission denied)"
        ) in backup.stderr
        assert list(drop.iterdir()) == []


class DeletedAsItWrites(SQLiteEventStore):
    """Its directory is removed while a batch is being written, once ``doomed`` is set: as
    an operator's ``rm`` landing during a commit's fsync."""

    doomed: Path | None = None

    def _write(self, batch: list[Any], *, one_by_one: bool = True) -> bool | None:
        committed = super()._write(batch, one_by_one=one_by_one)
        if self.doomed is not None:
            shutil.rmtree(self.doomed)
            self.doomed = None
        return committed


@contextlib.asynccontextmanager
async def served_from(
    folder: Path, kind: type[SQLiteEventStore] = SQLiteEventStore
) -> AsyncIterator[tuple[SQLiteEventStore, Clients]]:
    """A gateway on a SQLite store of ``kind`` in the new ``folder``, sku-1 stocked."""
    await asyncio.to_thread(folder.mkdir)
    store = await kind.open(folder / "events.db")
    try:
        async with running_gateway(store) as gateway, connect(gateway) as clients:
            await clients.restock("sku-1", 5)
            yield store, clients
    finally:
        await store.close()


async def test_a_commit_whose_file_is_deleted_as_it_is_written_is_not_answered_ok(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "store"
    async with served_from(folder, DeletedAsItWrites) as (store, clients):
        assert isinstance(store, DeletedAsItWrites)
        store.doomed = folder
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await clients.restock("sku-1", 1)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(refused.value).reason == "STORE_UNAVAILABLE"


async def test_a_deleted_store_file_is_not_read_to_subscribers(tmp_path: Path) -> None:
    # Its events would be ones whose commands were refused, or that vanish with the file.
    folder = tmp_path / "store"
    async with served_from(folder) as (_, clients):
        shutil.rmtree(folder)
        subscription = StreamReader.open(clients)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await subscription.next()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_commits_to_a_deleted_store_file_are_refused_unavailable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "store"
    async with served_from(folder) as (_, clients):
        shutil.rmtree(folder)  # an operator's mistake: the store's directory removed
        with caplog.at_level(logging.INFO, logger="order_gateway"):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await clients.restock("sku-1", 1)
            with pytest.raises(grpc.aio.AioRpcError) as refused_again:
                await clients.create(order_request(item("sku-1")))
    for error in (refused.value, refused_again.value):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(error).reason == "STORE_UNAVAILABLE"
    [fault] = lines(caplog, FAULT_LINE)
    assert "was deleted while the gateway served it" in fault.getMessage()


async def test_a_deleted_wal_file_refuses_commits_and_loses_none_acknowledged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "store"
    crashed = tmp_path / "as-a-crash-leaves-it.db"
    async with served_from(folder) as (store, clients):
        for _ in range(3):
            await clients.restock("sku-1", 1)
        acknowledged = await store.head_position()
        (folder / "events.db-wal").unlink()  # an operator's or a cleanup script's rm
        with (
            caplog.at_level(logging.INFO, logger="order_gateway"),
            pytest.raises(grpc.aio.AioRpcError) as refused,
        ):
            await clients.restock("sku-1", 1)
        # All that a process killed now would leave: the store's file, without a -wal.
        shutil.copy(folder / "events.db", crashed)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(refused.value).reason == "STORE_UNAVAILABLE"
    [fault] = lines(caplog, FAULT_LINE)
    assert "lost its events.db-wal file" in fault.getMessage()
    with contextlib.closing(sqlite3.connect(crashed)) as copy:
        assert copy.execute("SELECT max(position) FROM events").fetchone() == (acknowledged,)
    reopened = await SQLiteEventStore.open(folder / "events.db")
    try:
        assert await reopened.head_position() == acknowledged
    finally:
        await reopened.close()


class WalDeletedAsItWrites(SQLiteEventStore):
    """Its -wal file is deleted while a batch is being written, once ``doomed`` is set."""

    doomed: Path | None = None

    def _write(self, batch: list[Any], *, one_by_one: bool = True) -> bool | None:
        committed = super()._write(batch, one_by_one=one_by_one)
        if self.doomed is not None:
            self.doomed.unlink()
            self.doomed = None
        return committed


async def test_a_commit_whose_wal_file_is_deleted_as_it_is_written_is_answered_as_stored(
    tmp_path: Path,
) -> None:
    # Its events are copied into the store's file with the rest of the deleted -wal file:
    # refused, the command would be there all the same, and a client retrying a refusal
    # without its command_id would place a second order.
    folder = tmp_path / "store"
    crashed = tmp_path / "as-a-crash-leaves-it.db"
    async with served_from(folder, WalDeletedAsItWrites) as (store, clients):
        assert isinstance(store, WalDeletedAsItWrites)
        store.doomed = folder / "events.db-wal"
        restocked = await clients.restock("sku-1", 1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await clients.restock("sku-1", 1)
        shutil.copy(folder / "events.db", crashed)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(refused.value).reason == "STORE_UNAVAILABLE"
    with contextlib.closing(sqlite3.connect(crashed)) as copy:
        assert copy.execute("SELECT max(position) FROM events").fetchone() == (
            restocked[-1].position,
        )


async def test_a_replaced_wal_file_refuses_commits(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    async with served_from(folder) as (_, clients):
        wal = folder / "events.db-wal"
        wal.unlink()
        wal.touch()  # a fresh one, as a connection opened since would create
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await clients.restock("sku-1", 1)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(refused.value).reason == "STORE_UNAVAILABLE"


async def test_a_store_whose_wal_file_was_deleted_while_open_is_not_opened_beside_it(
    tmp_path: Path,
) -> None:
    # As a worker of ``serve --workers`` started while the others still serve.
    folder = tmp_path / "store"
    wal = folder / "events.db-wal"
    async with served_from(folder):
        wal.unlink()
        with pytest.raises(StoreUnavailableError, match=r"events\.db-shm is there without"):
            await SQLiteEventStore.open(folder / "events.db")
        assert not wal.exists()


@pytest.mark.parametrize(
    "tool", [["verify", "--store", "{url}"], ["backup", "--store", "{url}", "{folder}/copy.db"]]
)
async def test_a_tool_beside_a_store_whose_wal_file_was_deleted_is_refused_without_a_new_one(
    tmp_path: Path, tool: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # A fresh -wal of the tool's would take the deleted one's name: the gateway could no
    # longer copy what the deleted one holds (commands it answered) into the store.
    folder = tmp_path / "store"
    wal = folder / "events.db-wal"
    url = f"sqlite:///{folder / 'events.db'}"
    args = [part.format(url=url, folder=folder) for part in tool]
    async with served_from(folder):
        wal.unlink()
        code = await asyncio.to_thread(main, args)
        assert not wal.exists()
    assert code == 1
    assert "events.db-shm is there without events.db-wal" in capsys.readouterr().err
    assert not (folder / "copy.db").exists()


@pytest.mark.parametrize("on_loop", [False, True], ids=["writer-thread", "on-the-loop"])
async def test_files_that_cannot_be_checked_refuse_calls_until_they_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_loop: bool
) -> None:
    # What a gateway not run as root meets once its store's directory may not be searched
    # (or a failing disk, EIO): the check of the files before and after each batch raised,
    # the writer and reader threads died, and every later call waited for ever.
    store = await SQLiteEventStore.open(tmp_path / "store.db")
    if on_loop:
        store.commit_on_loop_when(lambda: True)
    await store.append(commit_of([("product-a", 1)]))
    stat = os.stat

    def refused_for_the_wal(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if str(path).endswith("-wal"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return stat(path, *args, **kwargs)

    try:
        monkeypatch.setattr("server.stores.sqlite.os.stat", refused_for_the_wal)
        async with asyncio.timeout(10):
            for call in (
                store.append(commit_of([("product-b", 1)])),
                store.read_all(0, 10),
                store.append(commit_of([("product-c", 1)])),
            ):
                with pytest.raises(StoreUnavailableError, match="cannot be checked"):
                    await call
        monkeypatch.setattr("server.stores.sqlite.os.stat", stat)
        async with asyncio.timeout(10):
            await store.append(commit_of([("product-d", 1)]))
            assert [e.stream_id for e in await store.read_all(0, 10)] == ["product-a", "product-d"]
    finally:
        await store.close()


# -- another process holding SQLite's write lock ---------------------------------------

LOCK_WAIT = 1.0
"""The busy timeout of these tests' stores, in seconds."""


def new_commit() -> Commit:
    stream = f"stream-{uuid.uuid4()}"
    return Commit(
        command_id=str(uuid.uuid4()),
        fingerprint="fingerprint",
        correlation_id="correlation",
        user_id="user-1",
        occurred_at=dt.datetime.now(dt.UTC),
        expected_versions={stream: 0},
        events=[NewEvent(str(uuid.uuid4()), stream, 1, "TestEvent", b"{}")],
    )


async def waited_for(store: SQLiteEventStore) -> float:
    """Seconds an append to ``store`` took to be refused STORE_UNAVAILABLE."""
    began = time.monotonic()
    with pytest.raises(StoreUnavailableError) as refused:
        await store.append(new_commit())
    assert str(refused.value.__cause__) == "database is locked"
    return time.monotonic() - began


@contextlib.contextmanager
def write_lock_held(database: Path) -> Iterator[None]:
    """SQLite's write lock on ``database`` held meanwhile, as a long ``sqlite3`` session
    in another process would hold it."""
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        yield
        other.execute("ROLLBACK")


async def test_appends_queued_behind_one_that_waits_out_the_lock_wait_no_longer(
    tmp_path: Path,
) -> None:
    database = tmp_path / "events.db"
    store = await SQLiteEventStore.open(database, busy_timeout=LOCK_WAIT)
    try:
        with write_lock_held(database):
            first = asyncio.create_task(waited_for(store))
            await asyncio.sleep(LOCK_WAIT / 4)
            queued = await asyncio.gather(*(waited_for(store) for _ in range(5)))
            assert await first >= LOCK_WAIT
    finally:
        await store.close()
    # Before, each batch waited the whole busy timeout again: 1.75 of it here.
    assert max(queued) < LOCK_WAIT * 1.3


async def test_an_append_waiting_for_its_turn_counts_that_wait_against_the_lock(
    tmp_path: Path,
) -> None:
    # Two processes of ``serve --workers``: the second waits for the turn the first
    # holds while it waits out the lock, then for the lock.
    database = tmp_path / "events.db"
    stores = [
        await SQLiteEventStore.open(database, writer_turns=True, busy_timeout=LOCK_WAIT)
        for _ in range(2)
    ]
    try:
        with write_lock_held(database):
            first = asyncio.create_task(waited_for(stores[0]))
            await asyncio.sleep(LOCK_WAIT / 4)
            second = await waited_for(stores[1])
            await first
    finally:
        for store in stores:
            await store.close()
    assert second < LOCK_WAIT * 1.3
