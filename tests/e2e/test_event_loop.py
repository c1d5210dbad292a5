"""`serve` runs on uvloop by default, on asyncio's own loop when told, and says which."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest

from tests.clients import item, order_request
from tests.serving import (
    free_port,
    gateway_log,
    signal_until_exit,
    start_gateway,
    wait_until_serving,
)
from tests.subscription_support import clients_on


async def order_after_restock(target: str) -> list[str]:
    """The event types of a restock then an order of the product, as a client sees them."""
    product = f"sku-{uuid.uuid4().hex[:8]}"
    async with grpc.aio.insecure_channel(target) as channel:
        clients = clients_on(channel)
        restocked = await clients.restock(product, 5)
        created = await clients.create(order_request(item(product, quantity=2)))
    return [event.event_type for event in (*restocked, *created)]


def supervisor_serving(gateway: subprocess.Popen[bytes], workers: int) -> None:
    """Wait until the supervisor says every worker serves."""
    deadline = time.monotonic() + 30
    while f"with {workers} workers" not in gateway_log(gateway):
        assert gateway.poll() is None, gateway_log(gateway)
        assert time.monotonic() < deadline, gateway_log(gateway)
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("variable", "expected"),
    [(None, "uvloop"), ("asyncio", "asyncio"), ("UVLOOP", "uvloop")],
)
@pytest.mark.parametrize("workers", [1, 2])
def test_serve_runs_on_the_event_loop_it_is_given_and_serves_there(
    tmp_path: Path, variable: str | None, expected: str, workers: int
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ORDER_GATEWAY_EVENT_LOOP"}
    if variable is not None:
        env["ORDER_GATEWAY_EVENT_LOOP"] = variable
    target = f"127.0.0.1:{free_port()}"
    store = f"sqlite:///{tmp_path / 'events.db'}"
    gateway = start_gateway(
        ["serve", "--listen", target, "--store", store, "--workers", str(workers)], env=env
    )
    try:
        asyncio.run(wait_until_serving(target, gateway))
        assert asyncio.run(order_after_restock(target)) == [
            "ProductRestocked",
            "OrderCreated",
            "StockReserved",
        ]
        if workers > 1:
            # One worker serves before the others: stopped then, the supervisor never says
            # its line (a loaded machine, once).
            supervisor_serving(gateway, workers)
    finally:
        signal_until_exit(gateway)
        assert gateway.wait(timeout=10) == 0
    log = gateway_log(gateway)
    # Each serving process, and the supervisor of several, names its loop.
    assert log.count(f"event loop {expected})") == (1 if workers == 1 else workers + 1), log
    other = "asyncio" if expected == "uvloop" else "uvloop"
    assert f"event loop {other}" not in log


def test_an_unknown_event_loop_is_refused_before_serving(tmp_path: Path) -> None:
    env = {**os.environ, "ORDER_GATEWAY_EVENT_LOOP": "tokio"}
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--store", f"sqlite:///{tmp_path / 'e.db'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == "order-gateway: event_loop: Input should be 'uvloop' or 'asyncio'\n"
    assert not (tmp_path / "e.db").exists()


def test_uvloop_missing_is_a_clear_refusal_naming_the_way_out(tmp_path: Path) -> None:
    # As on a platform uvloop is not built for: the import fails.
    script = (
        "import sys; sys.modules['uvloop'] = None\n"
        "from server.cli import main\n"
        f"sys.exit(main(['serve', '--store', 'sqlite:///{tmp_path / 'e.db'}']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr == (
        "order-gateway: event_loop uvloop: uvloop is not installed on this platform; "
        "install it, or set ORDER_GATEWAY_EVENT_LOOP=asyncio\n"
    )
