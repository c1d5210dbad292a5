"""``python -m bench``: run the benchmark sections, print the figures and the targets.

Sections: ``grpc`` (closed-loop CreateOrder / CancelOrder / mixed load on the gateway and
the bare-gRPC floor, interleaved point by point so that both see the same machine),
``inprocess`` (bus + domain + store against the ``eventsourcing`` library),
``subscriptions`` (catch-up over a million events, fan-out to live subscribers) and
``stream-length`` (a hot product's long stream against a fresh one).

    python -m bench --store memory --store sqlite --store postgresql://… --plot docs/bench.png
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
from orders.v1 import inventory_command_service_pb2, inventory_command_service_pb2_grpc

from bench import workload
from bench.inprocess import eventsourcing_commands, gateway_commands
from bench.loadgen import LoadSpec, run_load
from bench.plot import plot_load
from bench.report import Report, conditions, print_report
from bench.servers import ServerProcess, start_floor, start_gateway
from bench.stats import LoadResult
from bench.stores import StoreSpec, eventsourcing_env, supported
from bench.targets import evaluate, print_verdicts

SECTIONS = ("grpc", "inprocess", "subscriptions", "stream-length")
RESULTS = Path(__file__).resolve().parent / "results"


def _levels(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--store",
        action="append",
        dest="stores",
        metavar="STORE",
        help="memory, sqlite (a new file per measurement) or postgresql://… (a new database "
        "per measurement); repeatable (default: sqlite)",
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--concurrency",
        type=_levels,
        default=[1, 4, 16, 64],
        metavar="N,N,…",
        help="CreateOrder concurrency levels (default 1,4,16,64)",
    )
    parser.add_argument(
        "--workload-concurrency",
        type=int,
        default=16,
        metavar="N",
        help="concurrency of the cancel and mixed workloads (default 16)",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument(
        "--processes", type=int, default=2, help="client processes sharing the concurrency"
    )
    parser.add_argument(
        "--inprocess-concurrency",
        type=int,
        default=64,
        help="concurrent callers of the gateway's bus in the inprocess section (default 64)",
    )
    parser.add_argument("--catch-up-events", type=int, default=1_000_000)
    parser.add_argument("--subscribers", type=int, default=200)
    parser.add_argument(
        "--workdir", type=Path, help="folder for SQLite files and server logs (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "bench.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "bench.png")
    return parser


async def restock(target: str) -> None:
    """Give every benchmark product more stock than a run can use."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel)

        async def one(product_id: str) -> None:
            request = inventory_command_service_pb2.RestockProductRequest(
                product_id=product_id, quantity=workload.RESTOCK_QUANTITY
            )
            async for _ in stub.RestockProduct(request, timeout=60):
                pass

        products = workload.product_ids()
        for start in range(0, len(products), 50):
            await asyncio.gather(*(one(p) for p in products[start : start + 50]))


def _progress(result: LoadResult) -> None:
    print(
        f"  {result.workload:<6} c={result.concurrency:<3} {result.server:<10} "
        f"{result.calls_per_s:8,.0f} calls/s  p50 {result.latency.p50_ms:6.2f} ms  "
        f"p99 {result.latency.p99_ms:6.2f} ms  server CPU {result.server_cpu_ms_per_call:.3f} "
        f"ms/call",
        file=sys.stderr,
        flush=True,
    )


async def run_grpc(
    args: argparse.Namespace, specs: list[StoreSpec], workdir: Path, report: Report
) -> None:
    print("gRPC load: floor and gateway, point by point", file=sys.stderr)
    async with AsyncExitStack() as stack:
        servers: list[tuple[str, ServerProcess]] = []
        floor = await stack.enter_async_context(await start_floor(workdir, args.catch_up_events))
        servers.append(("floor", floor))
        for spec in specs:
            url = stack.enter_context(spec.fresh(workdir, f"grpc-{spec.kind}"))
            reason = await supported(url)
            if reason is not None:
                report.notes.append(f"gRPC on {spec.kind}: {reason}")
                continue
            gateway = await stack.enter_async_context(await start_gateway(url, workdir))
            await restock(gateway.target)
            servers.append((spec.kind, gateway))
        plan = [("create", level) for level in args.concurrency]
        plan += [(name, args.workload_concurrency) for name in ("cancel", "mixed")]
        for name, level in plan:
            for label, server in servers:
                load = LoadSpec(
                    target=server.target,
                    workload=name,
                    concurrency=level,
                    duration=args.duration,
                    warmup=args.warmup,
                    processes=args.processes,
                )
                result = await asyncio.to_thread(run_load, load, label, server.cpu_seconds)
                _progress(result)
                report.load.append(result)


async def run_inprocess(
    args: argparse.Namespace, specs: list[StoreSpec], workdir: Path, report: Report
) -> None:
    print("In-process: gateway bus against eventsourcing", file=sys.stderr)
    for spec in specs:
        for callers in sorted({1, args.inprocess_concurrency}):
            with spec.fresh(workdir, f"inprocess-{spec.kind}-{callers}") as url:
                reason = await supported(url)
                if reason is not None:
                    report.notes.append(f"in-process on {spec.kind}: {reason}")
                    break
                result = await gateway_commands(url, spec.kind, callers, args.duration, args.warmup)
            print(
                f"  gateway {spec.kind} x{callers}: {result.commands_per_s:,.0f} commands/s",
                file=sys.stderr,
            )
            report.inprocess.append(result)
        if spec.kind == "memory":
            continue  # eventsourcing's in-memory store is no durable backend to compare with
        with spec.fresh(workdir, f"inprocess-{spec.kind}-eventsourcing") as url:
            result = await asyncio.to_thread(
                eventsourcing_commands,
                eventsourcing_env(url),
                spec.kind,
                args.duration,
                args.warmup,
            )
        print(
            f"  eventsourcing {spec.kind}: {result.commands_per_s:,.0f} commands/s", file=sys.stderr
        )
        report.inprocess.append(result)


async def run(args: argparse.Namespace) -> Report:
    specs = [StoreSpec.parse(value) for value in args.stores or ["sqlite"]]
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections: {', '.join(sorted(unknown))}")
    report = Report(
        settings={
            "stores": [s.kind for s in specs],
            "sections": sections,
            "concurrency": args.concurrency,
            "workload_concurrency": args.workload_concurrency,
            "duration": args.duration,
            "warmup": args.warmup,
            "client_processes": args.processes,
            "inprocess_concurrency": args.inprocess_concurrency,
        }
    )
    with tempfile.TemporaryDirectory(prefix="order-gateway-bench-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        if "grpc" in sections:
            await run_grpc(args, specs, workdir, report)
        if "inprocess" in sections:
            await run_inprocess(args, specs, workdir, report)
    report.conditions_after = conditions()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = asyncio.run(run(args))
    print_report(report, sys.stdout)
    print_verdicts(evaluate(report), sys.stdout)
    report.save(args.json)
    print(f"\nresults: {args.json}")
    if report.load:
        print(f"plot: {plot_load(report, args.plot)}")
    return 0
