"""``order-gateway tail``: its client against grpc_testing's fake channel, then the real CLI.

With the fake channel the test plays the server's side of the Subscribe call: it sees the
request the CLI sent, and chooses the responses and the final status.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import grpc_testing
import pytest
from orders.v1 import event_stream_service_pb2, events_pb2

from server.client.ctrl_c import CtrlC
from server.client.tail import follow
from tests.clients import Clients
from tests.subscription_support import WAIT

SERVICE = event_stream_service_pb2.DESCRIPTOR.services_by_name["EventStreamService"]
SUBSCRIBE = SERVICE.methods_by_name["Subscribe"]


def event(position: int, product_id: str = "sku-1") -> event_stream_service_pb2.SubscribeResponse:
    return event_stream_service_pb2.SubscribeResponse(
        event=events_pb2.Event(
            event_id=f"00000000-0000-4000-8000-{position:012d}",
            stream_id=f"product-{product_id}",
            stream_version=position,
            position=position,
            event_type="ProductRestocked",
            product_restocked=events_pb2.ProductRestocked(
                product_id=product_id, quantity=1, available_after=position
            ),
        )
    )


def checkpoint(position: int) -> event_stream_service_pb2.SubscribeResponse:
    return event_stream_service_pb2.SubscribeResponse(
        checkpoint=event_stream_service_pb2.Checkpoint(position=position)
    )


class WatchedOutput(io.StringIO):
    """An output the test can wait on, to act only once the CLI has printed something."""

    def __init__(self) -> None:
        super().__init__()
        self.written = threading.Event()

    def write(self, text: str) -> int:
        count = super().write(text)
        self.written.set()
        return count


class Interrupting(io.StringIO):
    """An output that raises ``error`` on its first write (a closed pipe)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def write(self, text: str) -> int:
        raise self.error


@pytest.fixture
def channel() -> Any:
    return grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())


@pytest.fixture
def background() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def start_tail(
    pool: ThreadPoolExecutor,
    channel: Any,
    out: io.StringIO,
    err: io.StringIO,
    after: int = 0,
    types: tuple[str, ...] = (),
) -> Future[int]:
    return pool.submit(follow, channel, after, types, out, err)


def test_prints_each_event_as_one_json_line_and_exits_0_when_the_stream_ends(
    channel: Any, background: ThreadPoolExecutor
) -> None:
    out, err = io.StringIO(), io.StringIO()
    result = start_tail(background, channel, out, err, after=7, types=("ProductRestocked",))

    _, request, rpc = channel.take_unary_stream(SUBSCRIBE)
    assert request == event_stream_service_pb2.SubscribeRequest(
        after_position=7, event_types=["ProductRestocked"]
    )
    rpc.send_response(event(8))
    rpc.send_response(checkpoint(9))
    rpc.send_response(event(10, "sku-2"))
    rpc.terminate((), grpc.StatusCode.OK, "")

    assert result.result(timeout=WAIT) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, "checkpoints are not printed"
    first, second = (json.loads(line) for line in lines)
    assert first["position"] == "8"  # proto3 JSON writes 64-bit integers as strings
    assert first["event_type"] == "ProductRestocked"
    assert first["product_restocked"] == {
        "product_id": "sku-1",
        "quantity": 1,
        "available_after": "8",
    }
    assert second["stream_id"] == "product-sku-2"
    assert err.getvalue() == ""


def test_a_failed_call_is_reported_on_stderr_with_exit_1(
    channel: Any, background: ThreadPoolExecutor
) -> None:
    out, err = WatchedOutput(), io.StringIO()
    result = start_tail(background, channel, out, err)

    _, _, rpc = channel.take_unary_stream(SUBSCRIBE)
    rpc.send_response(event(1))
    # The fake channel drops responses not yet read when a call fails; a real one does not.
    assert out.written.wait(WAIT)
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    assert result.result(timeout=WAIT) == 1
    assert len(out.getvalue().splitlines()) == 1, "events before the failure are printed"
    assert err.getvalue() == "order-gateway tail: UNAVAILABLE: the server is shutting down\n"


class PressingCtrlC(io.StringIO):
    """An output during whose first write Ctrl-C is pressed, as SIGINT's handler in
    ``ctrl_c_stops`` takes it."""

    def __init__(self, ctrl_c: CtrlC) -> None:
        super().__init__()
        self.ctrl_c = ctrl_c

    def write(self, text: str) -> int:
        self.ctrl_c._pressed(signal.SIGINT, None)
        return super().write(text)


def test_ctrl_c_cancels_the_call_and_exits_0(channel: Any, background: ThreadPoolExecutor) -> None:
    ctrl_c = CtrlC()
    ctrl_c._start()
    try:
        err = io.StringIO()
        result = background.submit(
            follow, channel, 0, (), PressingCtrlC(ctrl_c), err, (), "", ctrl_c
        )

        _, _, rpc = channel.take_unary_stream(SUBSCRIBE)
        rpc.send_response(event(1))
        rpc.cancelled()  # blocks until the client cancels the call

        assert result.result(timeout=WAIT) == 0
        assert err.getvalue() == ""
    finally:
        ctrl_c._close()


def test_a_closed_output_cancels_the_call(channel: Any, background: ThreadPoolExecutor) -> None:
    result = start_tail(background, channel, Interrupting(BrokenPipeError()), io.StringIO())

    _, _, rpc = channel.take_unary_stream(SUBSCRIBE)
    rpc.send_response(event(1))
    rpc.cancelled()

    with pytest.raises(BrokenPipeError):
        result.result(timeout=WAIT)


@contextlib.asynccontextmanager
async def following(*flags: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``order-gateway tail`` with ``flags``, unbuffered, killed on the way out if still
    running."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "server.cli", "tail", *flags),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def interrupted(process: asyncio.subprocess.Process) -> int:
    """Its exit code after Ctrl-C."""
    process.send_signal(signal.SIGINT)
    return await process.wait()


async def test_the_cli_follows_a_real_gateway_until_sigint(gateway: Any, clients: Clients) -> None:
    await clients.restock("sku-1", 3)
    target = f"127.0.0.1:{gateway.port}"
    async with following("--target", target, "--type", "ProductRestocked") as process:
        assert process.stdout is not None and process.stderr is not None
        async with asyncio.timeout(WAIT):
            first = json.loads(await process.stdout.readline())
            await clients.restock("sku-2", 1)
            second = json.loads(await process.stdout.readline())
            code = await interrupted(process)
        assert (first["position"], second["position"]) == ("1", "2")
        assert code == 0
        assert await process.stderr.read() == b"", "no traceback on Ctrl-C"


async def tail_to_the_end(*flags: str) -> tuple[int | None, bytes, str]:
    """``order-gateway tail`` with ``flags``, run until it exits: its code, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "server.cli", "tail", *flags),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT):
        out, err = await process.communicate()
    return process.returncode, out, err.decode()


async def test_an_unknown_type_is_refused_with_the_servers_reason(gateway: Any) -> None:
    code, out, err = await tail_to_the_end(
        "--target", f"127.0.0.1:{gateway.port}", "--type", "OrderPlaced"
    )
    assert code == 1
    assert out == b""
    lines = err.splitlines()
    assert lines[0].startswith("order-gateway tail: INVALID_ARGUMENT: ")
    assert lines[1].startswith("  event_types[0]: unknown event type 'OrderPlaced'; known types: ")


@pytest.mark.parametrize("after", ["-1", str(2**64), "3_810", "٣٨١٠", " 38"])
async def test_an_after_no_position_can_hold_is_a_usage_error_naming_the_flag(after: str) -> None:
    code, out, err = await tail_to_the_end("--after", after)
    assert code == 2
    assert out == b""
    assert "--after" in err and "Traceback" not in err


async def test_stream_prints_only_that_streams_events(gateway: Any, clients: Clients) -> None:
    await clients.restock("sku-1", 3)
    await clients.restock("sku-2", 3)
    await clients.restock("sku-1", 1)
    target = f"127.0.0.1:{gateway.port}"
    async with following("--target", target, "--stream", "product-sku-1") as process:
        assert process.stdout is not None
        async with asyncio.timeout(WAIT):
            lines = [json.loads(await process.stdout.readline()) for _ in range(2)]
            code = await interrupted(process)
    assert [(line["position"], line["stream_id"]) for line in lines] == [
        ("1", "product-sku-1"),
        ("3", "product-sku-1"),
    ]
    assert code == 0


async def test_a_stream_no_stream_can_have_is_refused_with_the_servers_reason(
    gateway: Any,
) -> None:
    code, out, err = await tail_to_the_end(
        "--target", f"127.0.0.1:{gateway.port}", "--stream", "sku-1"
    )
    assert code == 1
    assert out == b""
    assert err.splitlines() == [
        "order-gateway tail: INVALID_ARGUMENT: invalid request: stream_id",
        "  stream_id: must be order-<order UUID> or product-<product_id>",
    ]


async def tail_writing_to(output: int, *flags: str) -> asyncio.subprocess.Process:
    """``order-gateway tail`` with ``flags`` writing to the descriptor ``output``, which
    is closed here (the process keeps its own)."""
    try:
        return await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "server.cli", "tail", *flags),
            stdout=output,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(output)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_output_that_cannot_be_written_is_an_error_with_exit_1(
    gateway: Any, clients: Clients
) -> None:
    await clients.restock("sku-1", 3)
    full = os.open("/dev/full", os.O_WRONLY)  # every write fails: no space left
    process = await tail_writing_to(full, "--target", f"127.0.0.1:{gateway.port}")
    async with asyncio.timeout(WAIT):
        _, err = await process.communicate()
    assert process.returncode == 1
    assert err.decode() == "order-gateway tail: cannot write the events: No space left on device\n"


async def test_a_reader_that_goes_away_on_a_quiet_stream_ends_tail_with_0(
    gateway: Any, clients: Clients
) -> None:
    """As `tail | head -1` on a stream with one event: no second line comes to find out
    the reader went away at, and tail still stops."""
    await clients.restock("sku-1", 3)
    read_end, write_end = os.pipe()
    process = await tail_writing_to(
        write_end, "--target", f"127.0.0.1:{gateway.port}", "--stream", "product-sku-1"
    )
    with os.fdopen(read_end, "rb") as reader:
        first = json.loads(await asyncio.wait_for(asyncio.to_thread(reader.readline), WAIT))
    # The reader closed its end, as head does after its line.
    async with asyncio.timeout(WAIT):
        _, err = await process.communicate()
    assert first["position"] == "1"
    assert process.returncode == 0
    assert err == b""
