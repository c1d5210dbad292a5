"""While ``serve`` opens its store, health answers NOT_SERVING and commands wait.

A probe must get an answer during a slow start (a database that is slow to answer), not
a connection that nobody serves until its own timeout; a command sent meanwhile runs once
the store is open, or is refused UNAVAILABLE before its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from orders.v1 import inventory_command_service_pb2, inventory_command_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import server.app as app
from domain.errors import StoreUnavailableError
from domain.ports import EventStore
from server.app import SERVICE_NAMES, serve
from server.config import Settings
from server.security.tls import add_port
from server.stores.factory import open_store
from tests.e2e.test_early_stop import exit_code, silent_database
from tests.serving import free_port, gateway_log, start_gateway
from tests.workers_support import env_without_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WAIT = 30.0


def restock_request() -> inventory_command_service_pb2.RestockProductRequest:
    return inventory_command_service_pb2.RestockProductRequest(product_id="sku-1", quantity=5)


async def restock(target: str, deadline: float | None = None) -> list[str]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel)
        call = stub.RestockProduct(restock_request(), timeout=deadline)
        return [response.event.event_type async for response in call]


async def statuses(target: str) -> dict[str, int]:
    """What Check answers for the whole server and each service, within a second each."""
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        return {
            service: (
                await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
            ).status
            for service in ("", *SERVICE_NAMES)
        }


async def refusal(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value.code(), refused.value.details() or ""


async def test_a_gateway_whose_database_does_not_answer_reports_not_serving() -> None:
    with silent_database() as (url, accepted):
        process = start_gateway(
            ["serve", "--listen", "127.0.0.1:0", "--store", url, "--log-level", "debug"],
            env=env_without_settings(),
        )
        try:
            async with asyncio.timeout(WAIT):
                while not accepted or "starting on" not in gateway_log(process):
                    assert process.poll() is None, gateway_log(process)
                    await asyncio.sleep(0.01)
            found = re.search(r"starting on (127\.0\.0\.1:\d+)", gateway_log(process))
            assert found is not None, gateway_log(process)
            target = found.group(1)

            assert await statuses(target) == {
                service: NOT_SERVING for service in ("", *SERVICE_NAMES)
            }
            # Held for most of its time, then refused with a code to retry on, with time
            # left to retry: 1 s before its deadline of 4 s (the refusal reaches the
            # client, on a loaded machine, well before its own deadline ends the call).
            started = time.monotonic()
            code, details = await refusal(restock(target, deadline=4.0))
            assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "the server is starting")
            waited = time.monotonic() - started
            assert 2.5 <= waited < 3.8
            # A call without a deadline is held until the stop, then refused as any call
            # that reaches a stopping gateway.
            held = asyncio.ensure_future(restock(target))
            await asyncio.sleep(0.3)
            assert not held.done()
            process.send_signal(signal.SIGTERM)
            code, details = await refusal(held)
            assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            assert await asyncio.to_thread(exit_code, process) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    log = gateway_log(process)
    assert "stopped before serving" in log
    assert "Traceback" not in log


@pytest.fixture
def slow_store_opening(monkeypatch: pytest.MonkeyPatch) -> SlowOpening:
    opening = SlowOpening(open_store, add_port)
    monkeypatch.setattr(app, "open_store", opening.open_store)
    monkeypatch.setattr(app, "add_port", opening.add_port)
    return opening


class SlowOpening:
    """Opens the store only once ``release`` is set; tells the port bound meanwhile."""

    def __init__(
        self, open_store: Callable[..., Awaitable[EventStore]], add_port: Callable[..., int]
    ) -> None:
        self._open_store = open_store
        self._add_port = add_port
        self.opening = asyncio.Event()
        self.release = asyncio.Event()
        self.fails = False
        self.port = 0

    def add_port(self, *args: Any) -> int:
        self.port = self._add_port(*args)
        return self.port

    async def open_store(self, *args: Any, **kwargs: Any) -> EventStore:
        self.opening.set()
        await self.release.wait()
        if self.fails:
            raise StoreUnavailableError("the database refused the connection")
        return await self._open_store(*args, **kwargs)


def serving_in_background(
    settings: Settings, stop: asyncio.Event | None = None, served: asyncio.Event | None = None
) -> asyncio.Future[None]:
    """``serve(settings)`` started as a task, without signal handlers or the process's
    stop bound, until ``stop``; ``served`` is set once it serves."""
    return asyncio.ensure_future(
        serve(
            settings,
            stop=stop or asyncio.Event(),
            signals=(),
            bounded=False,
            on_serving=None if served is None else (lambda gateway: served.set()),
        )
    )


async def test_commands_sent_while_the_store_opens_run_once_it_is_open(
    slow_store_opening: SlowOpening,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(app, "SLOW_OPEN_REPORT_SECONDS", (0.1, 0.1))
    caplog.set_level(logging.INFO, logger="order_gateway.server")
    stop = asyncio.Event()
    served = asyncio.Event()
    serving = serving_in_background(Settings(listen="127.0.0.1:0", store="memory://"), stop, served)
    try:
        async with asyncio.timeout(WAIT):
            await slow_store_opening.opening.wait()
        target = f"127.0.0.1:{slow_store_opening.port}"
        assert set((await statuses(target)).values()) == {NOT_SERVING}
        held = asyncio.ensure_future(restock(target, deadline=WAIT))
        await asyncio.sleep(0.3)
        assert not held.done()
        # A start that waits says so, again and again.
        assert caplog.text.count("still opening store memory:// after") >= 2

        slow_store_opening.release.set()
        assert await held == ["ProductRestocked"]
        async with asyncio.timeout(WAIT):
            await served.wait()
        assert set((await statuses(target)).values()) == {SERVING}
        assert await restock(target, deadline=WAIT) == ["ProductRestocked"]
    finally:
        stop.set()
        await serving


async def test_commands_held_while_the_store_opens_are_refused_if_it_fails_to_open(
    slow_store_opening: SlowOpening,
) -> None:
    slow_store_opening.fails = True
    serving = serving_in_background(Settings(listen="127.0.0.1:0", store="memory://"))
    async with asyncio.timeout(WAIT):
        await slow_store_opening.opening.wait()
    target = f"127.0.0.1:{slow_store_opening.port}"
    held = asyncio.ensure_future(restock(target))
    await asyncio.sleep(0.3)
    slow_store_opening.release.set()
    code, details = await refusal(held)
    assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
    with pytest.raises(StoreUnavailableError):
        await serving


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def test_metrics_are_served_while_the_store_opens_and_freed_if_it_fails(
    slow_store_opening: SlowOpening,
) -> None:
    slow_store_opening.fails = True
    port = free_port()
    serving = serving_in_background(
        Settings(listen="127.0.0.1:0", store="memory://", metrics_listen=f"127.0.0.1:{port}")
    )
    async with asyncio.timeout(WAIT):
        await slow_store_opening.opening.wait()
    # A scrape during a slow start finds the gateway up, not a refused connection.
    families = text_string_to_metric_families(await asyncio.to_thread(metrics_text, port))
    assert any(family.name.startswith("order_gateway_") for family in families)
    slow_store_opening.release.set()
    with pytest.raises(StoreUnavailableError):
        await serving
    with pytest.raises(OSError):
        await asyncio.to_thread(metrics_text, port)


async def test_the_metrics_address_chosen_for_port_0_is_logged_while_the_store_opens(
    slow_store_opening: SlowOpening, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="order_gateway.server")
    stop = asyncio.Event()
    served = asyncio.Event()
    serving = serving_in_background(
        Settings(listen="127.0.0.1:0", store="memory://", metrics_listen="127.0.0.1:0"),
        stop,
        served,
    )
    try:
        async with asyncio.timeout(WAIT):
            await slow_store_opening.opening.wait()
        addresses = re.findall(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", caplog.text)
        assert len(addresses) == 1
        # The port logged is the one served, while the store still opens.
        families = text_string_to_metric_families(
            await asyncio.to_thread(metrics_text, int(addresses[0]))
        )
        assert any(family.name.startswith("order_gateway_") for family in families)

        slow_store_opening.release.set()
        async with asyncio.timeout(WAIT):
            await served.wait()
        # Once only, not again when the gateway serves.
        assert re.findall(r"metrics at http://\S+", caplog.text) == [
            f"metrics at http://127.0.0.1:{addresses[0]}/metrics"
        ]
    finally:
        stop.set()
        await serving
