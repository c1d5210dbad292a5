"""A load generator that leaves the machine to the server: nghttp2's ``h2load``, an
HTTP/2 client written in C, sending ready-made gRPC requests.

The ``workers`` and ``replicas`` sections run the load generator on the cores the
gateway's processes share, and ``bench.loadgen``'s Python clients spend about half a
millisecond of CPU per call, about what a gateway process spends: time a second worker
or replica would otherwise have. h2load spends a few hundredths of that, so the
sections' figures with it show what the gateway's processes themselves do with the
cores (``--workers-load-generator h2load``, ``--replicas-load-generator h2load``).

h2load speaks HTTP/2, not gRPC: each caller is one h2load process on a connection of its
own, sending one gRPC-framed CreateOrder again and again, so each caller orders one
product: ``create`` gives every caller a product of its own, ``hot`` every caller the hot
product, ``hot-set`` spreads the callers over the hot set. Every order has one item, as
in ``bench.loadgen``, and the server picks each order's id. h2load cannot read a gRPC
status (it comes in the trailers, after an HTTP 200), so the calls' outcomes come from
the gateway's ``grpc_server_handled`` counter, read before and after the run. When its
duration ends, h2load resets the call each caller has in flight: the gateway counts it
CANCELLED (and h2load may log it without a status), so up to one such call per caller
is not a failure.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message
from orders.v1 import order_command_service_pb2

from bench import workload
from bench.loadgen import BARRIER_TIMEOUT, LoadError, LoadSpec
from bench.servers import cpu_seconds
from bench.stats import Latencies, LoadResult

WORKLOADS = ("create", "hot", "hot-set")
"""What one fixed request per caller can express."""
NAME = "h2load"
METHOD = "/orders.v1.OrderCommandService/CreateOrder"
REAP_POLL_SECONDS = 0.01


def h2load_command() -> str:
    found = shutil.which("h2load")
    if found is None:
        raise SystemExit("the h2load load generator needs h2load (Debian: nghttp2-client)")
    return found


def grpc_frame(message: Message) -> bytes:
    """``message`` as gRPC sends it: uncompressed, after its 4-byte length."""
    body = message.SerializeToString()
    return b"\0" + struct.pack(">I", len(body)) + body


def caller_request(
    workload_name: str, caller: int, callers: int
) -> order_command_service_pb2.CreateOrderRequest:
    """What caller ``caller`` of ``callers`` sends on every call."""
    if workload_name not in WORKLOADS:
        raise ValueError(f"h2load sends one fixed request per caller: not {workload_name!r}")
    product = {
        "create": caller * workload.PRODUCT_COUNT // callers,
        "hot": workload.HOT_PRODUCT,
        "hot-set": caller % workload.HOT_SET,
    }[workload_name]
    request = workload.create_request(random.Random(caller), str(uuid.uuid4()), products=1)
    request.items[0].product_id = workload.product_id(product)
    return request


@dataclass(frozen=True)
class Response:
    """One row of h2load's ``--log-file``."""

    started: float
    """Seconds since the epoch."""
    status: int
    """HTTP status; -1 for a stream that failed."""
    seconds: float

    @property
    def ended(self) -> float:
        return self.started + self.seconds


def parse_log(text: str) -> list[Response]:
    """h2load's log rows: start (µs since the epoch), status, µs to the response's end."""
    rows: list[Response] = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        rows.append(Response(int(fields[0]) / 1e6, int(fields[1]), int(fields[2]) / 1e6))
    return rows


def _running_cpu(processes: Sequence[subprocess.Popen[bytes]]) -> float:
    """What ``processes`` have spent so far."""
    total = 0.0
    for process in processes:
        try:
            total += cpu_seconds(process.pid)
        except FileNotFoundError:  # ended meanwhile: waited for, and counted, later
            continue
    return total


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def run_h2load(
    spec: LoadSpec,
    server: str,
    server_cpu: Callable[[], float] | None = None,
    handled: Callable[[], Counter[str]] | None = None,
) -> LoadResult:
    """Drive ``spec.target`` with ``spec.concurrency`` h2load processes, one caller each;
    block until done. ``handled``: the gateway's CreateOrder calls so far by status code,
    from which the run's failures are counted."""
    command = h2load_command()
    url = f"http://{spec.target}{METHOD}"
    codes_before = handled() if handled else Counter[str]()
    with tempfile.TemporaryDirectory(prefix="h2load-") as folder:
        logs = [Path(folder) / f"caller-{n}.log" for n in range(spec.concurrency)]
        arguments = []
        for n, log in enumerate(logs):
            body = Path(folder) / f"caller-{n}.bin"
            body.write_bytes(grpc_frame(caller_request(spec.workload, n, spec.concurrency)))
            arguments.append(
                [
                    command,
                    "--clients=1",
                    "--max-concurrent-streams=1",
                    f"--duration={_duration(spec.duration)}",
                    *([f"--warm-up-time={_duration(spec.warmup)}"] if spec.warmup > 0 else []),
                    "--header=content-type: application/grpc",
                    "--header=te: trailers",
                    f"--data={body}",
                    f"--log-file={log}",
                    url,
                ]
            )
        started = time.time()
        processes = []
        for n, arguments_of_one in enumerate(arguments):
            with (Path(folder) / f"caller-{n}.err").open("wb") as stderr:
                processes.append(
                    subprocess.Popen(arguments_of_one, stdout=subprocess.DEVNULL, stderr=stderr)
                )
        try:
            time.sleep(max(0.0, started + spec.warmup - time.time()))
            window_start = time.time()
            server_before = server_cpu() if server_cpu else 0.0
            # h2load's start and warm-up are not the window's: what it spent until now is
            # taken off what its processes spent in all, once they have ended.
            client_before = _running_cpu(processes)
            failures, client_spent = wait_for_callers(
                processes, Path(folder), spec.warmup + spec.duration + BARRIER_TIMEOUT
            )
            window_end = time.time()
            server_used = (server_cpu() if server_cpu else 0.0) - server_before
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    process.wait()
        client_used = client_spent - client_before
        if failures:
            raise LoadError(f"h2load failed: {'; '.join(failures)}")
        rows = [row for log in logs for row in parse_log(log.read_text())]
    codes = (handled() if handled else Counter[str]()) - codes_before
    return summarise(
        spec, server, rows, (window_start, window_end), server_used, client_used, codes
    )


def wait_for_callers(
    processes: Sequence[subprocess.Popen[bytes]], folder: Path, timeout: float
) -> tuple[list[str], float]:
    """Wait for every process: what those that failed said (caller N's standard error is
    ``caller-N.err`` in ``folder``), and the CPU all of them spent.

    Each one's own CPU, from ``wait4``: the children's total (``RUSAGE_CHILDREN``) would
    count another run's processes too, when two runs go at once (the replicas section).
    """
    failures: list[str] = []
    spent = 0.0
    deadline = time.monotonic() + timeout
    for n, process in enumerate(processes):
        ended = _reap(process, deadline)
        if ended is None:
            failures.append(f"h2load ran past {timeout:.0f} s")
            continue
        spent += ended
        if process.returncode != 0:
            said = (folder / f"caller-{n}.err").read_text(errors="replace").strip()
            failures.append(said.splitlines()[-1] if said else "no message")
    return failures, spent


def _reap(process: subprocess.Popen[bytes], deadline: float) -> float | None:
    """Wait until ``process`` ends, setting its return code: the CPU seconds it spent; or
    None, if it is still running at ``deadline``."""
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            return None
        time.sleep(REAP_POLL_SECONDS)


def summarise(
    spec: LoadSpec,
    server: str,
    rows: Sequence[Response],
    window: tuple[float, float],
    server_cpu_seconds: float,
    client_cpu_seconds: float,
    codes: Counter[str],
) -> LoadResult:
    """A ``LoadResult`` from h2load's rows (those of its measured duration): latency and
    calls/s of the calls that ended within ``spec.duration`` of the window's start; CPU
    per call, the server's and the load generator's, of the calls that ended between the
    two CPU readings (``window``, seconds since the epoch). ``codes``: the gateway's count
    of the run's calls by status code."""
    measured_end = window[0] + spec.duration
    latencies = [
        row.seconds
        for row in rows
        if row.status == 200 and window[0] <= row.started and row.ended <= measured_end
    ]
    ended_in_window = sum(1 for row in rows if window[0] <= row.ended <= window[1])
    cut_at_end = spec.concurrency
    errors: Counter[str] = Counter(
        {code: count for code, count in codes.items() if code != "OK" and count > 0}
    )
    errors["CANCELLED"] -= min(errors["CANCELLED"], cut_at_end)
    unanswered = Counter(
        f"HTTP {row.status}" if row.status > 0 else "no status" for row in rows if row.status != 200
    )
    unanswered["no status"] -= min(unanswered["no status"], cut_at_end)
    errors.update(unanswered)
    errors = +errors
    return LoadResult(
        server=server,
        workload=spec.workload,
        concurrency=spec.concurrency,
        duration=spec.duration,
        calls=len(latencies),
        calls_per_s=len(latencies) / spec.duration if spec.duration > 0 else 0.0,
        latency=Latencies.of(latencies),
        errors=dict(errors),
        server_cpu_ms_per_call=(
            server_cpu_seconds * 1e3 / ended_in_window if ended_in_window else 0.0
        ),
        client_cpu_ms_per_call=(
            client_cpu_seconds * 1e3 / ended_in_window if ended_in_window else 0.0
        ),
        load_generator=NAME,
    )
