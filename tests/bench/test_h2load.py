"""The h2load load generator (``bench.h2load``): the requests its callers send, how its
log and the gateway's counts become a load result, how its processes are waited for, and
a short run against a real gateway when h2load is installed."""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from orders.v1 import order_command_service_pb2

from bench import workload
from bench.h2load import (
    NAME,
    Response,
    caller_request,
    grpc_frame,
    parse_log,
    run_h2load,
    summarise,
    wait_for_callers,
)
from bench.load_generators import create_orders_handled
from bench.loadgen import LoadSpec
from bench.servers import free_port, restock, start_gateway

SPEC = LoadSpec("127.0.0.1:1", "create", concurrency=4, duration=2.0, warmup=0.5, processes=1)
START = 1_800_000_000.0


def test_create_gives_every_caller_a_product_of_its_own_spread_over_the_products() -> None:
    products = [caller_request("create", n, 4).items[0].product_id for n in range(4)]
    assert products == [workload.product_id(n) for n in (0, 250, 500, 750)]


def test_hot_and_hot_set_order_the_hot_products() -> None:
    hot = {caller_request("hot", n, 8).items[0].product_id for n in range(8)}
    assert hot == {workload.product_id(workload.HOT_PRODUCT)}
    spread = [caller_request("hot-set", n, 30).items[0].product_id for n in range(30)]
    assert spread[: workload.HOT_SET] == [workload.product_id(n) for n in range(workload.HOT_SET)]
    assert spread[workload.HOT_SET] == workload.product_id(0)


def test_a_caller_s_order_is_one_item_under_an_id_the_server_picks() -> None:
    request = caller_request("create", 1, 4)
    assert request.command_id == ""
    assert len(request.items) == 1 and request.items[0].quantity == 1


def test_workloads_one_fixed_request_cannot_express_are_refused() -> None:
    for name in ("keyed", "cancel", "mixed", "jwt"):
        with pytest.raises(ValueError, match="one fixed request"):
            caller_request(name, 0, 1)


def test_a_grpc_frame_is_the_message_after_an_uncompressed_flag_and_its_length() -> None:
    request = caller_request("create", 0, 1)
    frame = grpc_frame(request)
    assert frame[0] == 0
    (length,) = struct.unpack(">I", frame[1:5])
    assert length == len(frame) - 5
    parsed = order_command_service_pb2.CreateOrderRequest.FromString(frame[5:])
    assert parsed == request


def test_the_log_s_rows_are_start_status_and_time_to_the_end() -> None:
    rows = parse_log("1800000000250000\t200\t1500\n1800000000251600\t-1\t20\n\n")
    assert rows == [
        Response(1_800_000_000.25, 200, 0.0015),
        Response(1_800_000_000.2516, -1, 2e-05),
    ]
    assert rows[0].ended == pytest.approx(1_800_000_000.2515)


def test_calls_per_second_and_latency_count_the_calls_within_the_duration() -> None:
    rows = [Response(START + n * 0.01, 200, 0.004) for n in range(300)]
    result = summarise(SPEC, "sqlite x2", rows, (START, START + 3.0), 0.5, 0.05, Counter(OK=300))
    # Calls that began from the window's start and ended within its 2 s.
    assert result.calls == 200
    assert result.calls_per_s == pytest.approx(100.0)
    assert result.latency.p50_ms == pytest.approx(4.0)
    # CPU per call over every call that ended between the two readings.
    assert result.server_cpu_ms_per_call == pytest.approx(500 / 300)
    assert result.client_cpu_ms_per_call == pytest.approx(50 / 300)
    assert result.errors == {}
    assert result.load_generator == NAME


def test_the_call_h2load_resets_at_its_end_is_no_failure_but_more_are() -> None:
    rows = [Response(START + n * 0.01, 200, 0.004) for n in range(100)]
    cut = [Response(START + 1.99, 0, 0.01)] * 4
    quiet = summarise(SPEC, "s", rows + cut, (START, START + 2), 0, 0, Counter(OK=100, CANCELLED=4))
    assert quiet.errors == {}

    failing = summarise(
        SPEC,
        "s",
        [*rows, *cut, Response(START + 1, 0, 0.001), Response(START + 1, 503, 0.001)],
        (START, START + 2),
        0,
        0,
        Counter(OK=100, CANCELLED=5, FAILED_PRECONDITION=7),
    )
    assert failing.errors == {
        "CANCELLED": 1,
        "FAILED_PRECONDITION": 7,
        "no status": 1,
        "HTTP 503": 1,
    }


def _python(code: str, folder: Path, n: int) -> subprocess.Popen[bytes]:
    with (folder / f"caller-{n}.err").open("wb") as stderr:
        return subprocess.Popen([sys.executable, "-c", code], stderr=stderr)


BURN = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass"


def test_two_runs_waited_for_at_once_each_count_only_their_own_processes_cpu(
    tmp_path: Path,
) -> None:
    burning = _python(BURN, tmp_path, 0)
    sleeping = _python("import time; time.sleep(0.6)", tmp_path, 1)
    waited: dict[str, tuple[list[str], float]] = {}

    def wait(name: str, process: subprocess.Popen[bytes]) -> None:
        waited[name] = wait_for_callers([process], tmp_path, 30)

    threads = [
        threading.Thread(target=wait, args=("burning", burning)),
        threading.Thread(target=wait, args=("sleeping", sleeping)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert waited["burning"][0] == [] and waited["burning"][1] >= 0.35
    assert waited["sleeping"][0] == [] and waited["sleeping"][1] < 0.2
    assert burning.returncode == 0 and sleeping.returncode == 0


def test_a_failing_process_is_reported_by_the_last_line_it_wrote(tmp_path: Path) -> None:
    failing = _python("import sys; sys.exit('first\\nnot enough memory')", tmp_path, 0)
    failures, _ = wait_for_callers([failing], tmp_path, 30)
    assert failures == ["not enough memory"]
    assert failing.returncode == 1


def test_a_process_running_past_the_timeout_is_a_failure_and_left_to_the_caller(
    tmp_path: Path,
) -> None:
    running = _python("import time; time.sleep(30)", tmp_path, 0)
    try:
        failures, _ = wait_for_callers([running], tmp_path, 0.2)
        assert failures == ["h2load ran past 0 s"]
        assert running.returncode is None
    finally:
        running.kill()
        running.wait()


@pytest.mark.skipif(shutil.which("h2load") is None, reason="needs h2load (Debian: nghttp2-client)")
async def test_a_short_run_against_a_gateway_places_orders_without_failures(tmp_path: Path) -> None:
    metrics_port = free_port()
    async with await start_gateway(
        f"sqlite:///{tmp_path / 'events.db'}", tmp_path, metrics_port=metrics_port
    ) as gateway:
        await restock(gateway.target)
        spec = LoadSpec(
            gateway.target, "create", concurrency=2, duration=1.0, warmup=0.2, processes=1
        )
        result = await asyncio.to_thread(
            run_h2load,
            spec,
            "sqlite",
            gateway.cpu_seconds,
            lambda: create_orders_handled(metrics_port),
        )
        handled = create_orders_handled(metrics_port)
    assert result.calls > 0 and result.errors == {}
    assert handled["OK"] >= result.calls
    assert result.server_cpu_ms_per_call > 0 and result.client_cpu_ms_per_call > 0
