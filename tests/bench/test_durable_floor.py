"""The durable floor: the bare floor plus each command's events made durable in SQLite.

Its figures bound what any durable gateway can reach, so it must really do the durable
work (every call's events in the file, under the unique (stream, version) key, before the
answer) and nothing that would make it slower than it has to be is checked elsewhere (by
the benchmark itself).
"""

from __future__ import annotations

import asyncio
import io
import sqlite3
from pathlib import Path

import grpc
import pytest
from orders.v1 import order_command_service_pb2, order_command_service_pb2_grpc

from bench.durable_log import DurableLog
from bench.report import Report, print_report
from bench.servers import DURABLE_FLOOR, DURABLE_FLOOR_ON_LOOP, start_durable_floor
from bench.targets import evaluate
from tests.bench_support import made_up_load

CREATE = order_command_service_pb2.CreateOrderRequest()
CANCEL = order_command_service_pb2.CancelOrderRequest()


def _rows(path: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT stream, version FROM events ORDER BY position").fetchall()


@pytest.mark.parametrize("on_loop", [False, True], ids=["writer thread", "on the loop"])
async def test_concurrent_appends_are_in_the_file_when_they_return(
    tmp_path: Path, on_loop: bool
) -> None:
    path = tmp_path / "log.db"
    log = DurableLog(path, asyncio.get_running_loop(), on_loop=on_loop)
    try:
        await asyncio.gather(
            *(log.append([(f"s-{n}", 1, b"a"), (f"s-{n}", 2, b"b")]) for n in range(300))
        )
        # Read by another connection while the log is still open: committed, not buffered.
        rows = _rows(path)
    finally:
        log.close()
    assert sorted(rows) == sorted((f"s-{n}", v) for n in range(300) for v in (1, 2))


@pytest.mark.parametrize("on_loop", [False, True], ids=["writer thread", "on the loop"])
async def test_a_taken_stream_version_fails_the_append(tmp_path: Path, on_loop: bool) -> None:
    path = tmp_path / "log.db"
    log = DurableLog(path, asyncio.get_running_loop(), on_loop=on_loop)
    try:
        await log.append([("s", 1, b"a")])
        with pytest.raises(sqlite3.IntegrityError):
            await log.append([("s", 1, b"again")])
        await log.append([("s", 2, b"b")])
    finally:
        log.close()
    assert _rows(path) == [("s", 1), ("s", 2)]


@pytest.mark.parametrize("on_loop", [False, True], ids=["writer thread", "on the loop"])
async def test_durable_floor_answers_after_writing_each_calls_events(
    tmp_path: Path, on_loop: bool
) -> None:
    path = tmp_path / "floor.db"
    async with (
        await start_durable_floor(path, tmp_path, on_loop) as server,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        stub = order_command_service_pb2_grpc.OrderCommandServiceStub(channel)
        for n in range(3):
            answers = [r async for r in stub.CreateOrder(CREATE)]
            assert [a.event.WhichOneof("payload") for a in answers] == [
                "order_created",
                "stock_reserved",
            ]
            # The call ended after its events were committed, not some time later.
            assert _rows(path)[-2:] == [(f"order-{n}", 1), (f"order-{n}", 2)]
        cancelled = [r async for r in stub.CancelOrder(CANCEL)]
        assert len(cancelled) == 2
        assert _rows(path) == [(f"order-{n}", v) for n in range(4) for v in (1, 2)]


def test_report_sets_the_gateway_against_the_durable_floor() -> None:
    report = Report(
        load=[
            made_up_load("floor", 16, 1000, 10.0),
            made_up_load(DURABLE_FLOOR, 16, 700, 14.0),
            made_up_load("sqlite", 16, 560, 18.0),
            made_up_load(DURABLE_FLOOR_ON_LOOP, 16, 600, 15.0),
            made_up_load("floor", 1, 500, 1.0),
            made_up_load(DURABLE_FLOOR, 1, 400, 1.6),
            made_up_load(DURABLE_FLOOR_ON_LOOP, 1, 450, 1.5),
            made_up_load("sqlite", 1, 300, 2.4),
        ]
    )
    printed = io.StringIO()
    print_report(report, printed)
    cost = printed.getvalue().split("What durability alone costs")[1].splitlines()
    rows = [line.split() for line in cost[2:6]]
    assert rows == [
        ["create", "16", DURABLE_FLOOR, "0.70x", "1.40x", "0.80x", "1.29x"],
        ["create", "16", DURABLE_FLOOR_ON_LOOP, "0.60x", "1.50x", "0.93x", "1.20x"],
        ["create", "1", DURABLE_FLOOR, "0.80x", "1.60x", "0.75x", "1.50x"],
        ["create", "1", DURABLE_FLOOR_ON_LOOP, "0.90x", "1.50x", "0.67x", "1.60x"],
    ]
    # The targets are judged against the durable floors: the group-commit one's calls/s
    # at 16, the lowest durable p50 at 1; the bare floor's ratio is context.
    details = [v.detail for v in evaluate(report)[:2]]
    assert details == [
        "560 vs 700 calls/s = 0.80 x (bare floor: 0.56 x)",
        f"p50 2.40 vs 1.50 ms ({DURABLE_FLOOR_ON_LOOP}) = 1.60 x (bare floor: 2.40 x)",
    ]
