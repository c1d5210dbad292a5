"""A stop asked for while ``order-gateway serve`` still starts (its imports, its store
opening, its workers spawning) ends it gracefully, exit 0, without it ever serving: as a
container stopped just after it started expects."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from server.app import serve
from server.config import Settings
from server.consumer_groups.store_memory import MemoryConsumerGroupStore
from server.stores.memory import MemoryEventStore
from tests.serving import gateway_log, start_gateway
from tests.workers_support import env_without_settings

WAIT = 30.0


def catches(pid: int, signum: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler of its own for ``signum`` (Linux's /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def signal_once_caught(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    """Send ``signum`` as soon as ``process`` catches SIGTERM: the first thing the command
    does (SIGTERM held after SIGINT), a second or so before its imports are done."""
    deadline = time.monotonic() + WAIT
    while not catches(process.pid, signal.SIGTERM):
        assert process.poll() is None, gateway_log(process)
        assert time.monotonic() < deadline, "the command never caught SIGTERM"
        time.sleep(0.001)
    process.send_signal(signum)


def exit_code(process: subprocess.Popen[bytes]) -> int:
    try:
        return process.wait(WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"]
)
def test_a_stop_as_the_command_starts_ends_it_gracefully_before_it_serves(
    tmp_path: Path, signum: signal.Signals
) -> None:
    process = start_gateway(
        ["serve", "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path / 'events.db'}"],
        env=env_without_settings(),
        hangup="default",
    )
    signal_once_caught(process, signum)
    code = exit_code(process)
    log = gateway_log(process)
    assert code == 0, log
    assert "stopped before serving" in log
    assert "listening on" not in log
    assert "Traceback" not in log


def test_the_installed_command_holds_the_signals_too(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("order-gateway")
    if not script.exists():
        pytest.skip("order-gateway is not installed beside this Python")
    store = f"sqlite:///{tmp_path / 'events.db'}"
    with (tmp_path / "log").open("w+b") as log:
        process = subprocess.Popen(
            [str(script), "serve", "--listen", "127.0.0.1:0", "--store", store],
            env=env_without_settings(),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        signal_once_caught(process, signal.SIGTERM)
        # Caught before the imports: grpc's extension not loaded yet (it takes a few
        # hundred milliseconds more), not once serve has begun.
        loaded = Path(f"/proc/{process.pid}/maps").read_text()
        code = exit_code(process)
        log.seek(0)
        logged = log.read().decode()
    assert "cygrpc" not in loaded
    assert code == 0, logged
    assert "stopped before serving" in logged


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"]
)
def test_a_stop_as_the_workers_supervisor_starts_leaves_no_worker_behind(
    tmp_path: Path, signum: signal.Signals
) -> None:
    process = start_gateway(
        [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            f"sqlite:///{tmp_path / 'events.db'}",
            "--workers",
            "2",
        ],
        env=env_without_settings(),
        hangup="default",
    )
    signal_once_caught(process, signum)
    code = exit_code(process)
    # A worker spawned once the stop began would not hear its SIGTERM (a stopping
    # supervisor ignores the signal, and a child inherits that): it would go on starting
    # after its supervisor exited, and fail on the pipe it reports to.
    time.sleep(3)
    log = gateway_log(process)
    assert code == 0, log
    assert "stopped before serving" in log
    assert "listening on" not in log
    assert "Traceback" not in log


@contextmanager
def silent_database() -> Iterator[tuple[str, list[socket.socket]]]:
    """A PostgreSQL URL whose server takes connections and never answers, as one too busy
    to; and the connections it took so far."""
    accepted: list[socket.socket] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.05)
        port = listener.getsockname()[1]
        done = threading.Event()

        def accept() -> None:
            while not done.is_set():
                with suppress(TimeoutError):
                    accepted.append(listener.accept()[0])

        acceptor = threading.Thread(target=accept)
        acceptor.start()
        try:
            yield f"postgresql://gateway@127.0.0.1:{port}/orders", accepted
        finally:
            done.set()
            acceptor.join()
            for connection in accepted:
                connection.close()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_stop_while_the_store_opens_ends_the_start_at_once(workers: str) -> None:
    with silent_database() as (url, accepted):
        process = start_gateway(
            ["serve", "--listen", "127.0.0.1:0", "--store", url, "--workers", workers],
            env=env_without_settings(),
        )
        async with asyncio.timeout(WAIT):
            while not accepted:
                assert process.poll() is None, gateway_log(process)
                await asyncio.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await asyncio.to_thread(exit_code, process)
        took = time.monotonic() - started
    log = gateway_log(process)
    assert code == 0, log
    # Within the 10 s a stop may take, not after the store's own 10 s connect timeout.
    assert took < 10, log
    assert "stopped before serving" in log
    assert "Traceback" not in log


class SlowStore(MemoryEventStore):
    """Takes a while to open its consumer groups, as the gateway starts."""

    closed = False

    async def open_consumer_groups(self) -> MemoryConsumerGroupStore:
        await asyncio.sleep(0.5)
        return await super().open_consumer_groups()

    async def close(self) -> None:
        self.closed = True
        await super().close()


async def test_a_store_handed_to_serve_is_closed_when_the_stop_comes_first() -> None:
    # As a worker's, which opens its store before it serves.
    store = SlowStore()
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    await serve(
        Settings(listen="127.0.0.1:0", store="memory://"),
        store=store,
        stop=stop,
        signals=(),
        bounded=False,
    )
    assert store.closed
