"""``serve --workers 2`` end to end, on SQLite and PostgreSQL: one address, every worker
serving, the guarantees of one process kept across them, and a graceful stop."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import tempfile
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from domain.errors import StoreUnavailableError
from server import app
from server.config import Settings
from server.workers import supervisor
from server.workers.supervisor import worker_count
from server.workers.worker import WorkerSpec, run_worker
from tests.clients import item, order_request
from tests.serving import (
    free_port,
    gateway_log,
    listening_stranger,
    signal_until_exit,
    start_gateway,
)
from tests.subscription_support import StreamReader
from tests.workers_support import (
    WAIT,
    alive,
    env_without_settings,
    ready_after_a_while,
    spread_clients,
    workers_gateway,
)

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
CHANNELS = 16
"""Connections the tests spread over two workers: all landing on one is a 2^-15 chance."""


def handled_by_worker(metrics_text: str) -> dict[str, float]:
    """CreateOrder calls answered OK, by the ``worker`` label."""
    handled: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if (
                sample.name == "grpc_server_handled_total"
                and sample.labels.get("grpc_method") == "CreateOrder"
                and sample.labels.get("grpc_code") == "OK"
            ):
                worker = sample.labels["worker"]
                handled[worker] = handled.get(worker, 0) + sample.value
    return handled


async def scrape_when_all_serve(port: int | None) -> str:
    """/metrics once the supervisor counts both workers serving (it may lag the health
    check, which one serving worker already answers)."""
    url = f"http://127.0.0.1:{port}/metrics"
    async with asyncio.timeout(WAIT):
        while True:
            text: str = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
            if "order_gateway_workers 2.0" in text:
                return text
            await asyncio.sleep(0.1)


def scrape_openmetrics(port: int | None) -> tuple[str, str]:
    """/metrics as Prometheus asks for it: its content type and text."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Accept": OPENMETRICS}
    )
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        return str(response.headers["Content-Type"]), str(response.read().decode())


async def test_every_worker_serves_and_metrics_say_which(store_url: str) -> None:
    # Connections are opened only once both workers listen (a live worker process may not
    # listen yet), and enough of them that the kernel's spread cannot miss a worker by
    # chance (all 32 on one: 2 ** -31).
    channels = 32
    async with workers_gateway(store_url, metrics=True) as gateway:
        await scrape_when_all_serve(gateway.metrics_port)
        async with spread_clients(gateway.target, channels) as clients:
            await clients[0].restock("p", 1000)
            await asyncio.gather(*(c.create(order_request(item("p"))) for c in clients))
        text = await scrape_when_all_serve(gateway.metrics_port)

    handled = handled_by_worker(text)
    assert set(handled) == {"1", "2"}
    assert sum(handled.values()) == channels
    assert "order_gateway_workers 2.0" in text


async def test_metrics_of_every_worker_parse_in_openmetrics_and_the_classic_format(
    tmp_path: Path,
) -> None:
    # Prometheus asks for OpenMetrics first; the classic text format is what a scrape
    # without an Accept header (curl, older scrapers) gets.
    channels = 32
    async with workers_gateway(f"sqlite:///{tmp_path / 'events.db'}", metrics=True) as gateway:
        await scrape_when_all_serve(gateway.metrics_port)
        async with spread_clients(gateway.target, channels) as clients:
            await clients[0].restock("p", 1000)
            await asyncio.gather(*(c.create(order_request(item("p"))) for c in clients))
        classic = await scrape_when_all_serve(gateway.metrics_port)
        content_type, openmetrics = await asyncio.to_thread(
            scrape_openmetrics, gateway.metrics_port
        )

    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    families = {
        family.name: family
        for family in parse_openmetrics(openmetrics)  # type: ignore[no-untyped-call]
    }
    handled = families["grpc_server_handled"]
    assert handled.type == "counter"
    # The counter's series and their _created series, every worker's, in its family.
    by_kind: dict[str, set[str]] = {}
    for sample in handled.samples:
        by_kind.setdefault(sample.name, set()).add(sample.labels["worker"])
    assert by_kind == {
        "grpc_server_handled_total": {"1", "2"},
        "grpc_server_handled_created": {"1", "2"},
    }
    created_ok = [
        s.value
        for s in handled.samples
        if s.name == "grpc_server_handled_total"
        and s.labels["grpc_method"] == "CreateOrder"
        and s.labels["grpc_code"] == "OK"
    ]
    assert sum(created_ok) == channels
    for worker in ("1", "2"):
        latency = [
            s
            for s in families["grpc_server_handling_seconds"].samples
            if s.labels["worker"] == worker and s.labels["grpc_method"] == "CreateOrder"
        ]
        count = next(s.value for s in latency if s.name.endswith("_count"))
        assert count > 0
        inf = [s.value for s in latency if s.labels.get("le") == "+Inf"]
        assert inf == [count]
    assert [s.value for s in families["order_gateway_workers"].samples] == [2]
    assert [s.name for s in families["order_gateway_worker_restarts"].samples] == [
        "order_gateway_worker_restarts_total",
        "order_gateway_worker_restarts_created",
    ]

    # The classic format has the _created series as gauges of their own.
    assert sum(handled_by_worker(classic).values()) == channels
    classic_families = {family.name: family for family in text_string_to_metric_families(classic)}
    assert classic_families["grpc_server_handled_created"].type == "gauge"
    assert set(classic_families) - set(families) == {
        f"{name}_created"
        for name, family in families.items()
        if family.type in ("counter", "histogram")
        and any(s.name.endswith("_created") for s in family.samples)
    }


async def test_no_oversell_no_gap_and_replays_across_workers(store_url: str) -> None:
    stock, orders = 40, 120
    async with (
        workers_gateway(store_url) as gateway,
        spread_clients(gateway.target, CHANNELS) as clients,
    ):
        subscribers = [StreamReader.open(c) for c in clients[:4]]
        await clients[0].restock("scarce", stock)
        requests = [
            order_request(item("scarce"), command_id=str(uuid.uuid4())) for _ in range(orders)
        ]
        outcomes = await asyncio.gather(
            *(clients[n % CHANNELS].create(r) for n, r in enumerate(requests)),
            return_exceptions=True,
        )
        placed = {
            r.command_id: o for r, o in zip(requests, outcomes, strict=True) if isinstance(o, list)
        }
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(placed) == stock
        assert {e.code() for e in refused} == {grpc.StatusCode.FAILED_PRECONDITION}
        assert len(placed) + len(refused) == orders

        # The same command through another worker replays it: same ids, same positions.
        for n, request in enumerate(requests):
            if request.command_id in placed:
                again = await clients[(n + 1) % CHANNELS].create(request)
                assert again == placed[request.command_id]

        # Every subscriber, wherever it is connected, sees one gapless sequence.
        head = max(e.position for events in placed.values() for e in events)
        seen = [await s.through(head) for s in subscribers]
        positions = [e.position for e in seen[0]]
        assert positions == sorted(set(positions))
        assert len(positions) == 1 + 2 * stock
        assert all([e.event_id for e in s] == [e.event_id for e in seen[0]] for s in seen)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_stops_every_worker_within_ten_seconds(
    tmp_path: Path, signum: signal.Signals
) -> None:
    async with (
        workers_gateway(f"sqlite:///{tmp_path / 'events.db'}") as gateway,
        spread_clients(gateway.target, 4) as clients,
    ):
        workers = gateway.workers()
        subscriptions = [StreamReader.open(c) for c in clients]
        for subscription in subscriptions:
            await subscription.next_checkpoint()

        gateway.process.send_signal(signum)
        code = await asyncio.to_thread(gateway.process.wait, 10)

        assert code == 0, gateway.log
        assert not any(alive(pid) for pid in workers)
        # Open subscriptions were ended, not cut: each stream closed with a status.
        for subscription in subscriptions:
            assert await subscription.status() in (
                grpc.StatusCode.OK,
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
            )
        assert "shutting down 2 workers" in gateway.log
        # A stop that goes as planned is no error: an operator's alerts stay quiet.
        assert " ERROR " not in gateway.log, gateway.log


async def test_signals_repeated_while_the_workers_stop_change_nothing(tmp_path: Path) -> None:
    async with workers_gateway(f"sqlite:///{tmp_path / 'events.db'}") as gateway:
        workers = gateway.workers()
        await asyncio.to_thread(signal_until_exit, gateway.process)

        assert gateway.process.returncode == 0, gateway.log
        assert not any(alive(pid) for pid in workers)


def serve_and_fail(*args: str) -> tuple[int, str]:
    process = start_gateway(["serve", *args], env=env_without_settings())
    try:
        code = process.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    return code, gateway_log(process)


def test_the_memory_store_with_workers_is_refused() -> None:
    code, log = serve_and_fail(
        "--listen", f"127.0.0.1:{free_port()}", "--store", "memory://", "--workers", "2"
    )
    assert code == 2
    assert "memory:// lives inside one process" in log


def test_an_address_a_stranger_listens_on_is_refused(tmp_path: Path) -> None:
    with socket.socket() as stranger:
        # As grpc binds by default: SO_REUSEPORT set, which the workers also set.
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        code, log = serve_and_fail(
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            f"sqlite:///{tmp_path / 'e.db'}",
            "--workers",
            "2",
        )
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}: another process listens there" in log


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_metrics_address_is_refused_before_the_store_is_created(
    tmp_path: Path, workers: str
) -> None:
    with listening_stranger() as metrics:
        code, log = serve_and_fail(
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            metrics,
            "--store",
            f"sqlite:///{tmp_path / 'new.db'}",
            "--workers",
            workers,
        )
    assert code == 2, log
    assert f"cannot serve metrics on {metrics}: Address already in use" in log
    assert "Traceback" not in log
    # A refused start leaves nothing behind: no database, -wal, -shm or -writers file.
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(
    ("listen", "metrics"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("localhost", "127.0.0.1"),
        ("127.0.0.1", "0.0.0.0"),
        ("[::1]", "localhost"),
    ],
)
def test_a_metrics_address_on_the_grpc_address_is_refused_before_the_store_is_created(
    tmp_path: Path, listen: str, metrics: str, workers: str
) -> None:
    # A bind could succeed beside it: the workers' reservation does not listen, and
    # localhost binds 127.0.0.1 first while gRPC took ::1. The workers would then fail
    # to bind, or serve on one loopback address alone; clients of localhost would reach
    # the wrong server.
    port = free_port()
    code, log = serve_and_fail(
        "--listen",
        f"{listen}:{port}",
        "--metrics-listen",
        f"{metrics}:{port}",
        "--store",
        f"sqlite:///{tmp_path / 'new.db'}",
        "--workers",
        workers,
    )
    assert code == 2, log
    assert f"cannot serve metrics on {metrics}:{port}: Address already in use" in log
    assert "Traceback" not in log
    assert list(tmp_path.iterdir()) == []


async def test_only_the_supervisor_logs_a_metrics_address_above_debug(tmp_path: Path) -> None:
    # Each worker serves its metrics on a loopback port of its own for the supervisor to
    # read: an address that operators never configured and must not scrape.
    async with workers_gateway(
        f"sqlite:///{tmp_path / 'events.db'}", metrics=True, options=["--log-level", "DEBUG"]
    ) as gateway:
        async with asyncio.timeout(WAIT):
            while "with 2 workers" not in gateway.log:  # noqa: ASYNC110 - a file has no event
                await asyncio.sleep(0.05)
        lines = [line for line in gateway.log.splitlines() if "/metrics" in line]

    scrape = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    shown = [line for line in lines if " DEBUG " not in line]
    assert len(shown) == 1, lines
    assert shown[0].endswith(f" INFO order_gateway.workers: metrics of all workers at {scrape}")
    for worker in (1, 2):
        assert any(
            f" DEBUG order_gateway.server [worker {worker}]: metrics for the supervisor at " in line
            for line in lines
        ), lines


async def test_the_supervisor_serves_and_logs_its_metrics_address_while_the_store_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    opening, release = asyncio.Event(), asyncio.Event()

    async def slow_migrate(url: str) -> None:
        # A database that answers late, then refuses: the start fails before any worker.
        opening.set()
        await release.wait()
        raise StoreUnavailableError("the database refused the connection")

    monkeypatch.setattr(supervisor, "migrate", slow_migrate)
    monkeypatch.setattr(supervisor, "stop_signals", tuple)
    caplog.set_level(logging.INFO, logger="order_gateway.workers")
    settings = Settings(
        listen=f"127.0.0.1:{free_port()}",
        store=f"sqlite:///{tmp_path / 'events.db'}",
        workers=2,
        metrics_listen="127.0.0.1:0",
    )
    supervising = asyncio.ensure_future(supervisor.supervise(settings))
    try:
        async with asyncio.timeout(WAIT):
            await opening.wait()
        ports = re.findall(r"metrics of all workers at http://127\.0\.0\.1:(\d+)/", caplog.text)
        assert len(ports) == 1
        url = f"http://127.0.0.1:{ports[0]}/metrics"
        with await asyncio.to_thread(urllib.request.urlopen, url, timeout=WAIT) as response:
            text = response.read().decode()
        assert "order_gateway_workers 0.0" in text.splitlines()
    finally:
        release.set()
        with pytest.raises(StoreUnavailableError):
            await supervising


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(
    ("family", "loopback"),
    [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")],
    ids=["127.0.0.1", "::1"],
)
def test_localhost_is_refused_while_a_stranger_listens_on_either_loopback(
    tmp_path: Path, workers: str, family: socket.AddressFamily, loopback: str
) -> None:
    # grpc binds "localhost" to both loopback addresses, whatever /etc/hosts says: a
    # stranger on one of them would take the calls of clients that resolve to it.
    if family == socket.AF_INET6 and not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    with socket.socket(family) as stranger:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stranger.bind((loopback, free_port()))
        stranger.listen()
        port = stranger.getsockname()[1]
        process = start_gateway(
            [
                "serve",
                "--listen",
                f"localhost:{port}",
                "--store",
                f"sqlite:///{tmp_path / 'e.db'}",
                "--workers",
                workers,
            ],
            env=env_without_settings(),
        )
        try:
            # A refusal comes before anything serves; a gateway still running then serves.
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=WAIT)
            pytest.fail(f"served beside a stranger on {loopback}: {gateway_log(process)}")
    log = gateway_log(process)
    if workers == "1":
        assert code == 1, log
        assert f"Failed to bind to address localhost:{port}: another process listens there" in log
    else:
        assert code == 2, log
        assert f"cannot listen on localhost:{port}: another process listens there" in log
    assert "Traceback" not in log


async def test_a_second_gateway_on_the_address_is_refused(tmp_path: Path) -> None:
    async with workers_gateway(f"sqlite:///{tmp_path / 'a.db'}") as gateway:
        for workers in ("2", "1"):
            code, log = serve_and_fail(
                "--listen",
                gateway.target,
                "--store",
                f"sqlite:///{tmp_path / 'b.db'}",
                "--workers",
                workers,
            )
            assert code != 0, log
        assert gateway.process.poll() is None


def test_zero_workers_means_one_per_cpu_and_a_negative_count_is_refused() -> None:
    assert worker_count(0) == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3
    code, log = serve_and_fail("--workers", "-1")
    assert code == 2
    assert "workers: Input should be greater than or equal to 0" in log


def test_a_worker_whose_supervisor_is_gone_as_it_starts_says_so_without_a_traceback(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # As a replacement worker whose supervisor was killed meanwhile: the hub's socket is
    # not there any more.
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    watched, lifeline = context.Pipe(duplex=False)
    with tempfile.TemporaryDirectory(prefix="og-") as folder:
        spec = WorkerSpec(Settings(), 1, str(Path(folder) / "hub.sock"), groups_via_hub=True)
        worker = context.Process(target=run_worker, args=(spec, sender, watched))
        worker.start()
        worker.join(WAIT)
    lifeline.close()
    receiver.close()
    assert worker.exitcode == 1
    logged = capfd.readouterr().err
    assert "the supervisor process is gone" in logged
    assert "Traceback" not in logged


async def test_a_worker_that_begins_to_serve_as_a_stop_cancels_its_start_can_still_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stop while workers start stops waiting for them, then sends each its SIGTERM. A
    # worker that began to serve meanwhile says so first: were that refused, it would
    # take the refusal for its supervisor's death and log an ERROR.
    monkeypatch.setattr(supervisor, "run_worker", ready_after_a_while)
    outcome = tmp_path / "outcome"
    slot = supervisor._Slot(WorkerSpec(Settings(), 1, str(outcome), groups_via_hub=True))
    starting = asyncio.ensure_future(slot.start(asyncio.Event()))
    await asyncio.sleep(0.1)
    assert slot.process is not None and not starting.done()
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert await asyncio.wait_for(slot.exited(), WAIT) == 0
    assert outcome.read_text() == "sent"


async def test_a_stop_signal_while_workers_start_is_not_kept_waiting_for_them(
    tmp_path: Path,
) -> None:
    # Eight workers take seconds to start on a machine of few CPUs: the stop bound counts
    # from the signal, not from the moment the last of them serves.
    process = start_gateway(
        [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            f"sqlite:///{tmp_path / 'events.db'}",
            "--workers",
            "8",
        ],
        env=env_without_settings(),
    )
    try:
        async with asyncio.timeout(WAIT):
            while "starting 8 workers" not in gateway_log(process):  # noqa: ASYNC110 - a child's log
                await asyncio.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = gateway_log(process)
    assert code == 0, log
    assert "stopping while 8 workers start" in log
    assert "with 8 workers" not in log


def token_file(path: Path, *entries: tuple[str, str]) -> None:
    """(token, user_id) pairs, each allowed to restock."""
    path.write_text(
        "".join(
            f'[[token]]\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
            f'user_id = "{user}"\nscopes = ["inventory:write"]\n'
            for token, user in entries
        )
    )


async def test_a_replaced_worker_serves_the_credentials_the_gateway_started_with(
    tmp_path: Path,
) -> None:
    # One process reads its token file (keys, certificates) at start only. A worker that
    # replaces one that died read the file as it then was: the same token was accepted
    # on some connections and refused on others, a revoked one still valid on some.
    tokens = tmp_path / "tokens.toml"
    token_file(tokens, ("kept-token", "kept"))
    options = ["--auth-tokens", str(tokens)]
    async with workers_gateway(f"sqlite:///{tmp_path / 'w.db'}", options=options) as gateway:
        token_file(tokens, ("added-token", "added"))
        os.kill(min(gateway.workers()), signal.SIGKILL)
        async with asyncio.timeout(WAIT):
            while "replaced (pid" not in gateway.log:  # noqa: ASYNC110 - a log has no event
                await asyncio.sleep(0.05)
        answers: dict[str, list[str]] = {"kept-token": [], "added-token": []}
        async with spread_clients(gateway.target, CHANNELS) as clients:
            for token, codes in answers.items():
                for client in clients:
                    metadata = (("authorization", f"Bearer {token}"),)
                    try:
                        await client.restock("sku-1", 1, metadata=metadata)
                        codes.append("OK")
                    except grpc.aio.AioRpcError as error:
                        codes.append(error.code().name)
    assert answers["kept-token"] == ["OK"] * CHANNELS
    assert answers["added-token"] == ["UNAUTHENTICATED"] * CHANNELS


async def test_the_supervisor_says_while_the_store_is_slow_to_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As one process does: a start that says nothing while its database does not answer
    looks hung."""
    release = asyncio.Event()

    async def slow_migrate(url: str) -> None:
        await release.wait()
        raise StoreUnavailableError("the database refused the connection")

    monkeypatch.setattr(supervisor, "migrate", slow_migrate)
    monkeypatch.setattr(supervisor, "stop_signals", tuple)
    monkeypatch.setattr(app, "SLOW_OPEN_REPORT_SECONDS", (0.05, 0.05))
    caplog.set_level(logging.INFO, logger="order_gateway")
    store = f"sqlite:///{tmp_path / 'events.db'}"
    settings = Settings(listen=f"127.0.0.1:{free_port()}", store=store, workers=2)
    supervising = asyncio.ensure_future(supervisor.supervise(settings))
    try:
        async with asyncio.timeout(WAIT):
            while "still opening store" not in caplog.text:  # noqa: ASYNC110 - a log line
                await asyncio.sleep(0.01)
    finally:
        release.set()
        with pytest.raises(StoreUnavailableError):
            await supervising
    assert f"order-gateway still opening store {store} after " in caplog.text
