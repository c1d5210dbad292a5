"""The closed-loop load generator: client processes, each a grpc.aio client with N calls in flight.

Closed loop: each of the ``concurrency`` callers sends its next call as soon as the last one
ended, so throughput and latency are the server's answer to exactly that much concurrency.
Callers are spread over separate processes (``spawn``: no grpc state crosses a fork) so
that the client's own Python is not the bottleneck being measured. Processes start
together at a barrier the parent also waits on; the parent reads the server's CPU time
there and at the end, for CPU per call.

Workloads: ``create`` (CreateOrder), ``hot`` (CreateOrder, every order on one product),
``hot-set`` (CreateOrder, orders spread over a few dozen products), ``cancel``
(CancelOrder of orders each process created in an unmeasured phase before), ``mixed``
(each caller alternates creating an order and cancelling it).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.queues
import queue
import random
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from orders.v1 import order_command_service_pb2_grpc

from bench import workload
from bench.stats import Latencies, LoadResult
from bench.tokens import bearer

BARRIER_TIMEOUT = 120.0
CALL_TIMEOUT = 30.0
"""A call that takes longer than this fails (DEADLINE_EXCEEDED) rather than stall a run."""


@dataclass(frozen=True)
class LoadSpec:
    target: str
    workload: str
    concurrency: int
    duration: float
    warmup: float
    processes: int
    channels: int = 1
    """Connections per client process, each with its callers: a server of several
    processes sharing a port (``--workers``) is balanced by connection, not by call."""
    token: str = ""
    """A bearer token sent with every call, if any."""

    @property
    def prefill(self) -> float:
        """Seconds of creating orders before a cancel run: more than it can cancel."""
        return 2.0 * (self.warmup + self.duration) if self.workload == "cancel" else 0.0


@dataclass
class WorkerReport:
    latencies: list[float] = field(default_factory=list)
    window: float = 0.0
    completed: int = 0
    """Successful calls after the start barrier, warm-up included (for CPU per call)."""
    errors: Counter[str] = field(default_factory=Counter)
    response_bytes: dict[str, list[int]] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    cut_short: bool = False
    failure: str = ""


class _Caller:
    """One process's calls: sends requests, checks answers, keeps the cancel pool."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        seed: int,
        report: WorkerReport,
        products: int = workload.PRODUCT_COUNT,
        keyed: bool = False,
        token: str = "",
    ) -> None:
        self._stub = order_command_service_pb2_grpc.OrderCommandServiceStub(channel)
        self._products = products
        self._keyed = keyed
        self._metadata = bearer(token)
        self._rng = random.Random(seed)
        self._customer = str(uuid.uuid4())
        self._report = report
        self.pool: deque[str] = deque()

    async def create(self) -> str | None:
        """Place an order; its id, or None if the call failed."""
        request = workload.create_request(self._rng, self._customer, self._products, self._keyed)
        try:
            responses = [
                r
                async for r in self._stub.CreateOrder(
                    request, timeout=CALL_TIMEOUT, metadata=self._metadata
                )
            ]
        except grpc.aio.AioRpcError as error:
            self._report.errors[error.code().name] += 1
            return None
        self._check("CreateOrder", responses)
        return str(responses[0].event.order_created.order_id)

    async def cancel(self, order_id: str) -> bool:
        request = workload.cancel_request(order_id)
        try:
            responses = [
                r
                async for r in self._stub.CancelOrder(
                    request, timeout=CALL_TIMEOUT, metadata=self._metadata
                )
            ]
        except grpc.aio.AioRpcError as error:
            self._report.errors[error.code().name] += 1
            return False
        self._check("CancelOrder", responses)
        return True

    def _check(self, rpc: str, responses: list[Any]) -> None:
        if len(responses) != 2:
            raise AssertionError(f"{rpc} streamed {len(responses)} events, expected 2")
        if rpc not in self._report.response_bytes:
            self._report.response_bytes[rpc] = [r.ByteSize() for r in responses]


async def _prefill(caller: _Caller, callers: int, seconds: float) -> None:
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        while time.perf_counter() < deadline:
            order_id = await caller.create()
            if order_id is not None:
                caller.pool.append(order_id)

    await asyncio.gather(*(loop() for _ in range(callers)))


class _Window:
    """The measured window, shared by one process's callers; the cancel pool may cut it."""

    def __init__(self, warmup: float, duration: float) -> None:
        self.start = time.perf_counter() + warmup
        self.end = self.start + duration

    def cut(self) -> None:
        self.end = min(self.end, time.perf_counter())


async def _measure(
    callers: list[_Caller], spec: LoadSpec, count: int, report: WorkerReport
) -> None:
    """``count`` closed loops, spread over ``callers`` (one per connection)."""
    window = _Window(spec.warmup, spec.duration)

    def record(started: float, ok: bool) -> None:
        finished = time.perf_counter()
        if not ok:
            return
        report.completed += 1
        if window.start <= started and finished <= window.end:
            report.latencies.append(finished - started)

    async def creating(caller: _Caller) -> None:
        while (started := time.perf_counter()) < window.end:
            record(started, await caller.create() is not None)

    async def cancelling(caller: _Caller) -> None:
        while (started := time.perf_counter()) < window.end:
            if not caller.pool:
                report.cut_short = True
                window.cut()
                return
            record(started, await caller.cancel(caller.pool.popleft()))

    async def alternating(caller: _Caller) -> None:
        open_order: str | None = None
        while (started := time.perf_counter()) < window.end:
            if open_order is None:
                open_order = await caller.create()
                record(started, open_order is not None)
            else:
                record(started, await caller.cancel(open_order))
                open_order = None

    loops: dict[str, Callable[[_Caller], Any]] = {
        "create": creating,
        "hot": creating,
        "hot-set": creating,
        "keyed": creating,
        "jwt": creating,
        "cancel": cancelling,
        "mixed": alternating,
    }
    await asyncio.gather(*(loops[spec.workload](callers[n % len(callers)]) for n in range(count)))
    report.window = max(0.0, window.end - window.start)


async def _drive(
    spec: LoadSpec, callers: int, seed: int, barrier: threading.Barrier
) -> WorkerReport:
    report = WorkerReport()
    connections = max(1, min(spec.channels, callers))
    # A pool of its own per channel: grpc would otherwise share one connection among
    # channels to the same target.
    options = [("grpc.use_local_subchannel_pool", 1)] if connections > 1 else []
    channels = [grpc.aio.insecure_channel(spec.target, options) for _ in range(connections)]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), BARRIER_TIMEOUT)
        products = {"hot": 1, "hot-set": workload.HOT_SET}.get(
            spec.workload, workload.PRODUCT_COUNT
        )
        keyed = spec.workload == "keyed"
        clients = [
            _Caller(c, seed * 1000 + n, report, products, keyed=keyed, token=spec.token)
            for n, c in enumerate(channels)
        ]
        barrier.wait(BARRIER_TIMEOUT)
        await asyncio.gather(
            *(
                _prefill(client, share, spec.prefill)
                for client, share in zip(clients, split(callers, connections), strict=True)
            )
        )
        barrier.wait(BARRIER_TIMEOUT)
        cpu_before = time.process_time()
        await _measure(clients, spec, callers, report)
        report.cpu_seconds = time.process_time() - cpu_before
    finally:
        for channel in channels:
            await channel.close()
    return report


def _worker(
    spec: LoadSpec,
    callers: int,
    seed: int,
    barrier: threading.Barrier,
    reports: multiprocessing.queues.Queue[WorkerReport],
) -> None:
    try:
        report = asyncio.run(_drive(spec, callers, seed, barrier))
    except Exception as error:
        barrier.abort()
        report = WorkerReport(failure=f"{type(error).__name__}: {error}")
    reports.put(report)


def split(concurrency: int, processes: int) -> list[int]:
    """Callers per process: as even as possible, no process without a caller."""
    processes = max(1, min(processes, concurrency))
    base, extra = divmod(concurrency, processes)
    return [base + (1 if n < extra else 0) for n in range(processes)]


class LoadError(RuntimeError):
    pass


def run_load(
    spec: LoadSpec, server: str, server_cpu: Callable[[], float] | None = None
) -> LoadResult:
    """Drive ``spec.target`` with ``spec`` from fresh client processes; block until done."""
    context = multiprocessing.get_context("spawn")
    shares = split(spec.concurrency, spec.processes)
    barrier = context.Barrier(len(shares) + 1)
    reports: multiprocessing.queues.Queue[WorkerReport] = context.Queue()
    workers = [
        context.Process(
            target=_worker, args=(spec, callers, n, barrier, reports), daemon=True, name=f"load-{n}"
        )
        for n, callers in enumerate(shares)
    ]
    for process in workers:
        process.start()
    collected: list[WorkerReport] = []
    try:
        barrier.wait(BARRIER_TIMEOUT)
        barrier.wait(BARRIER_TIMEOUT + spec.prefill)
        cpu_before = server_cpu() if server_cpu else 0.0
        for _ in workers:
            collected.append(reports.get(timeout=spec.warmup + spec.duration + BARRIER_TIMEOUT))
        cpu_used = (server_cpu() if server_cpu else 0.0) - cpu_before
    except (threading.BrokenBarrierError, queue.Empty) as error:
        failures: list[str] = []
        try:
            while len(failures) < len(workers):
                failures.append(reports.get(timeout=5.0).failure)
        except queue.Empty:
            pass
        raise LoadError(
            f"load run failed: {'; '.join(filter(None, failures)) or error!r}"
        ) from None
    finally:
        for process in workers:
            process.join(BARRIER_TIMEOUT)
            if process.is_alive():
                process.kill()
    failures = [r.failure for r in collected if r.failure]
    if failures:
        raise LoadError("; ".join(failures))
    return _combine(spec, server, collected, cpu_used)


def _combine(
    spec: LoadSpec, server: str, reports: list[WorkerReport], server_cpu_seconds: float
) -> LoadResult:
    latencies = [latency for r in reports for latency in r.latencies]
    # Each process measured its own window (a cancel run may cut it): add up rates.
    rate = sum(len(r.latencies) / r.window for r in reports if r.window > 0)
    completed = sum(r.completed for r in reports)
    errors: Counter[str] = Counter()
    sizes: dict[str, list[int]] = {}
    for report in reports:
        errors.update(report.errors)
        for rpc, measured in report.response_bytes.items():
            sizes.setdefault(rpc, measured)
    per_call_ms = 1e3 / completed if completed else 0.0
    return LoadResult(
        server=server,
        workload=spec.workload,
        concurrency=spec.concurrency,
        duration=min((r.window for r in reports), default=0.0),
        calls=len(latencies),
        calls_per_s=rate,
        latency=Latencies.of(latencies),
        errors=dict(errors),
        response_bytes=sizes,
        server_cpu_ms_per_call=server_cpu_seconds * per_call_ms,
        client_cpu_ms_per_call=sum(r.cpu_seconds for r in reports) * per_call_ms,
        cut_short=any(r.cut_short for r in reports),
    )
