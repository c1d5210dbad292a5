"""PostgreSQL stopped and started again under load: callers are told STORE_UNAVAILABLE,
the gateway recovers by itself, and not one unit of stock is lost or counted twice.

The test stops a server, so it starts one of its own (scripts/start-postgres) rather
than the suite's shared one; it runs only where the suite has PostgreSQL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2

from server.app import create_server
from server.config import Settings
from server.stores.postgres import PostgresEventStore
from tests.clients import Clients, detail, item, order_request
from tests.serving import free_port
from tests.subscription_support import (
    StreamReader,
    connect,
    identities,
    running_gateway,
    stored,
)

pytestmark = pytest.mark.postgres

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
CALLERS = 8
STOCK = 1_000_000
WAIT = 120.0
"""Bound on every wait, so that a hang fails instead of blocking the suite."""


class PostgresServer:
    """A PostgreSQL server of this test's own, which it may stop and start."""

    def __init__(self, directory: Path) -> None:
        self.data = directory / "data"
        self.port = free_port()
        self.url = ""

    def start(self) -> None:
        started = subprocess.run(
            [SCRIPTS / "start-postgres", self.data, str(self.port)],
            check=True,
            capture_output=True,
            text=True,
        )
        self.url = started.stdout.strip()

    def stop(self) -> None:
        subprocess.run([SCRIPTS / "stop-postgres", self.data], check=True, capture_output=True)


@pytest.fixture
def own_postgres(postgres_url: str) -> Iterator[PostgresServer]:
    # Under /tmp, readable by the postgres user the script runs the server as (pytest's
    # own temporary directories are private to this user).
    directory = Path(tempfile.mkdtemp(prefix="order-gateway-faults-"))
    directory.chmod(0o755)
    server = PostgresServer(directory)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def store(own_postgres: PostgresServer) -> AsyncIterator[PostgresEventStore]:
    # A short pool timeout: calls made while the server is down fail after 2 s, not 10.
    opened = await PostgresEventStore.open(own_postgres.url, pool_timeout=2.0)
    yield opened
    await opened.close()


class Load:
    """Callers placing one-unit orders for one product, each retried with its command_id
    until it is acknowledged, as the contract says a client may."""

    def __init__(self, clients: Clients) -> None:
        self.clients = clients
        self.acknowledged: list[str] = []
        self.refusals: collections.Counter[tuple[str, str]] = collections.Counter()
        self.stopping = asyncio.Event()
        self.refused = asyncio.Event()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for _ in range(CALLERS):
                group.create_task(self._caller())

    async def _caller(self) -> None:
        while not self.stopping.is_set():
            request = order_request(item("sku-1"), command_id=str(uuid.uuid4()))
            while True:
                try:
                    await self.clients.create(request)
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                    reason = detail(error, error_details_pb2.ErrorInfo).reason
                    self.refusals[(code.name, reason)] += 1
                    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED), (
                        f"{code.name} {reason}: {error.details()}"
                    )
                    if code == grpc.StatusCode.UNAVAILABLE:
                        self.refused.set()
                    await asyncio.sleep(0.05)
                    continue
                self.acknowledged.append(request.command_id)
                break

    async def until_acknowledged(self, more: int) -> None:
        target = len(self.acknowledged) + more
        async with asyncio.timeout(WAIT):
            while len(self.acknowledged) < target:  # noqa: ASYNC110 - counted by callers
                await asyncio.sleep(0.05)


async def test_postgres_restarted_under_load_is_unavailable_then_recovers_exactly(
    own_postgres: PostgresServer,
    store: PostgresEventStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_gateway(store) as gateway, connect(gateway) as clients:
        await clients.restock("sku-1", STOCK)
        live = StreamReader.open(clients)
        await live.next_checkpoint()
        load = Load(clients)
        with caplog.at_level(logging.INFO, logger="order_gateway"):
            running = asyncio.create_task(load.run())
            await load.until_acknowledged(200)

            await asyncio.to_thread(own_postgres.stop)
            async with asyncio.timeout(WAIT):
                await load.refused.wait()
            late = StreamReader.open(clients)
            with pytest.raises(grpc.aio.AioRpcError) as subscribe_refused:
                await late.next()
            assert subscribe_refused.value.code() == grpc.StatusCode.UNAVAILABLE
            info = detail(subscribe_refused.value, error_details_pb2.ErrorInfo)
            assert info.reason == "STORE_UNAVAILABLE"

            await asyncio.to_thread(own_postgres.start)
            await load.until_acknowledged(200)
            # The fault ends with a call that works a quiet second after the last failure.
            async with asyncio.timeout(WAIT):
                while "event store works again" not in caplog.text:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            load.stopping.set()
            async with asyncio.timeout(WAIT):
                await running

        assert load.refusals[("UNAVAILABLE", "STORE_UNAVAILABLE")] > 0
        assert set(load.refusals) <= {
            ("UNAVAILABLE", "STORE_UNAVAILABLE"),
            ("ABORTED", "CONCURRENCY_CONFLICT"),
        }
        # Exact arithmetic: every acknowledged order reserved one unit, once.
        (restocked,) = await clients.restock("sku-1", 1)
        assert restocked.product_restocked.available_after == STOCK + 1 - len(load.acknowledged)
        events = await store.read_all(0, 1_000_000)
        created = [e.command_id for e in events if e.event_type == "OrderCreated"]
        reserved = [e for e in events if e.event_type == "StockReserved"]
        assert sorted(created) == sorted(load.acknowledged)
        assert len(reserved) == len(load.acknowledged)
        # The live subscriber saw every committed event, in order, across the restart.
        head = await store.head_position()
        assert identities(await live.through(head)) == await stored(store)
        live.call.cancel()

    faults = [r for r in caplog.records if "event store fault" in r.getMessage()]
    recoveries = [r for r in caplog.records if "event store works again" in r.getMessage()]
    # One line per fault, not per failed call. While PostgreSQL shuts down it terminates
    # the pool's connections one by one, so a call on one not yet terminated can succeed
    # between failures: that ends the fault and the next failure starts another.
    assert 1 <= len(faults) <= 4, [r.getMessage() for r in faults]
    assert len(recoveries) == len(faults)
    assert sum(load.refusals.values()) > len(faults)
    assert "Traceback" not in caplog.text


async def test_the_pool_size_bounds_the_connections(
    own_postgres: PostgresServer,
) -> None:
    settings = Settings(listen="127.0.0.1:0", store=own_postgres.url, store_pool_size=3)
    gateway = await create_server(settings)
    await gateway.start()
    try:
        async with connect(gateway) as clients:
            await busy_with_reads(clients)
        with psycopg.connect(own_postgres.url, autocommit=True) as admin:
            (count,) = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'order-gateway'"
            ).fetchone() or (0,)
    finally:
        await gateway.stop()
    assert 2 <= count <= 3


async def busy_with_reads(clients: Clients) -> None:
    """Orders from several callers while subscribers catch up: reads the pool must serve."""
    await clients.restock("sku-1", STOCK)
    load = Load(clients)
    running = asyncio.create_task(load.run())
    readers = [StreamReader.open(clients) for _ in range(20)]
    await asyncio.gather(*(reader.next_checkpoint() for reader in readers))
    await load.until_acknowledged(100)
    load.stopping.set()
    await running
    for reader in readers:
        reader.call.cancel()


async def test_calls_after_postgres_restarted_while_quiet_are_all_answered(
    own_postgres: PostgresServer, store: PostgresEventStore
) -> None:
    """The restart is over before the next call: the connections PostgreSQL closed while
    idle (the writer's, the pool's) are replaced before they are used, so no caller hears
    of a restart that no longer matters."""
    async with running_gateway(store) as gateway, connect(gateway) as clients:
        await clients.restock("sku-1", STOCK)
        # Several connections in use at once, so that the pool holds more than one.
        load = Load(clients)
        running = asyncio.create_task(load.run())
        await load.until_acknowledged(100)
        load.stopping.set()
        await running

        await asyncio.to_thread(own_postgres.stop)
        await asyncio.to_thread(own_postgres.start)

        failures: list[str] = []

        async def create() -> None:
            try:
                await clients.create(order_request(item("sku-1")))
            except grpc.aio.AioRpcError as error:
                failures.append(f"{error.code().name}: {error.details()}")

        for _ in range(20):
            await create()
        await asyncio.gather(*(create() for _ in range(CALLERS * 4)))
    assert failures == []
