"""``python -m bench``: run the benchmark sections, print the figures and the targets.

Sections: ``grpc`` (closed-loop CreateOrder / CancelOrder / mixed load on the gateway and
the bare-gRPC floor, interleaved point by point so that both see the same machine; with
``--store sqlite`` also on the durable floors, the floor plus a bare SQLite commit per call),
``inprocess`` (bus + domain + store against the ``eventsourcing`` library),
``subscriptions`` (catch-up over a million events, fan-out to live subscribers),
``stream-length`` (a hot product's long stream against a fresh one, its cold start after a
restart with and without snapshots, and ``verify``'s events/s on each store), ``replicas``
(two gateways on one PostgreSQL database, every order on one product, then orders spread
over 24 products; needs a ``postgresql://`` store), ``workers`` (``serve --workers 2``
against ``--workers 1``, and live delivery across workers) and ``consumer-groups``
(groups of 1, 2 and 4 members draining a backlog against Subscribe's catch-up, then
following CreateOrder load, and the gateway's RSS with a group of 100 members;
``bench/consumer_groups.py``).

    python -m bench --store memory --store sqlite --store postgresql://… --plot docs/bench.png
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
from collections.abc import Sequence
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path

from bench import (
    consumer_groups,
    replicas,
    stream_length,
    subscriptions,
    verify_rate,
    workers,
    workload,
)
from bench.inprocess import eventsourcing_commands, gateway_commands
from bench.load_generators import LOAD_GENERATORS
from bench.loadgen import LoadSpec, run_load
from bench.plot import plot_load
from bench.report import (
    ColdStartResult,
    Report,
    StreamLengthResult,
    VerifyResult,
    conditions,
    print_report,
)
from bench.servers import (
    ServerProcess,
    restock,
    start_durable_floor,
    start_floor,
    start_gateway,
)
from bench.stats import LoadResult, median_round
from bench.stores import StoreSpec, eventsourcing_env, quiet_disks, supported
from bench.targets import evaluate, print_verdicts
from bench.tokens import bench_issuer

COLD_START_WARM_ORDERS = 30
"""Orders after each measured cold start; their p50 is the warm figure."""
SECTIONS = (
    "grpc",
    "inprocess",
    "subscriptions",
    "stream-length",
    "replicas",
    "workers",
    "consumer-groups",
)
RESULTS = Path(__file__).resolve().parent / "results"


def _levels(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _names(text: str) -> list[str]:
    names = [part for part in text.split(",") if part]
    unknown = set(names) - set(workload.WORKLOADS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown workloads: {', '.join(sorted(unknown))}")
    return names


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
        help="concurrency levels of the create, hot, keyed and jwt workloads (default 1,4,16,64)",
    )
    parser.add_argument(
        "--workloads",
        type=_names,
        default=list(workload.WORKLOADS),
        metavar="NAME,…",
        help=f"of {', '.join(workload.WORKLOADS)} (default all; hot-set is measured by the "
        "replicas section alone, which runs it whatever this says)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="N",
        help="interleaved rounds of every gRPC point; with more than one, each figure is "
        "the median of its rounds and the targets give the range of the rounds' ratios "
        "(default 1)",
    )
    parser.add_argument(
        "--workload-concurrency",
        type=int,
        default=16,
        metavar="N",
        help="concurrency of the cancel and mixed workloads (default 16)",
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="measured seconds per point (default 5)"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each (default 1)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="client processes sharing the concurrency (default 2)",
    )
    parser.add_argument(
        "--inprocess-concurrency",
        type=int,
        default=64,
        help="concurrent callers of the gateway's bus in the inprocess section (default 64)",
    )
    parser.add_argument(
        "--catch-up-events",
        type=int,
        default=1_000_000,
        help="events in the store a subscriber catches up on (default 1,000,000)",
    )
    parser.add_argument(
        "--subscribers",
        type=int,
        default=200,
        help="live subscribers in fan-out (default 200; 0 skips the fan-out measurement)",
    )
    parser.add_argument(
        "--stream-events",
        type=int,
        default=100_000,
        help="events on the long hot stream (default 100,000)",
    )
    parser.add_argument(
        "--stream-orders",
        type=int,
        default=300,
        help="orders measured on each stream (default 300)",
    )
    parser.add_argument(
        "--replica-callers",
        type=int,
        default=8,
        metavar="N",
        help="callers on each of the two replicas in the replicas section (default 8)",
    )
    parser.add_argument(
        "--replica-duration",
        type=float,
        default=20.0,
        help="measured seconds of the replicas section (default 20)",
    )
    parser.add_argument(
        "--replicas-load-generator",
        choices=LOAD_GENERATORS,
        default="python",
        help="the replicas section's load generator: python or h2load, as for"
        " --workers-load-generator (default python)",
    )
    parser.add_argument(
        "--snapshot-intervals",
        type=lambda value: [int(n) for n in value.split(",") if n],
        default=[25, 50, 100],
        help="snapshot intervals whose cold start is measured, besides none (default 25,50,100)",
    )
    parser.add_argument(
        "--cold-starts",
        type=int,
        default=11,
        help="restarts measured per snapshot interval and store (default 11; the median is"
        " reported: one restart's latency moves a lot on a busy machine)",
    )
    parser.add_argument(
        "--verify-events",
        type=int,
        default=1_000_000,
        help="events in the log verify checks, per store (default 1,000,000; 0 skips)",
    )
    parser.add_argument(
        "--workers-rounds",
        type=int,
        default=2,
        help="interleaved rounds of --workers 1 and 2 in the workers section (default 2)",
    )
    parser.add_argument(
        "--workers-processes",
        type=int,
        default=workers.CLIENT_PROCESSES,
        help="client processes of the workers section, sharing its "
        f"{workers.CONNECTIONS} connections (default {workers.CLIENT_PROCESSES})",
    )
    parser.add_argument(
        "--workers-load-generator",
        choices=LOAD_GENERATORS,
        default="python",
        help="the workers section's load generator: python (grpc.aio clients, about as much"
        " CPU per call as a worker) or h2load (nghttp2's C client, with one product per"
        " caller; Debian: nghttp2-client) (default python)",
    )
    parser.add_argument(
        "--group-events",
        type=int,
        default=100_000,
        help="events in the backlog consumer groups drain (default 100,000)",
    )
    parser.add_argument(
        "--group-rounds",
        type=int,
        default=2,
        help="interleaved rounds of Subscribe and groups over the backlog (default 2)",
    )
    parser.add_argument(
        "--group-members",
        type=int,
        default=100,
        help="members of the large live consumer group (default 100; 0 skips it)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="folder for SQLite files and server logs (default: a temp dir)"
    )
    parser.add_argument(
        "--json", type=Path, default=RESULTS / "bench.json", help="where to save every figure"
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=RESULTS / "bench.png",
        help="PNG of CreateOrder throughput and p99 against concurrency",
    )
    return parser


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
        servers: list[tuple[str, ServerProcess, str]] = []
        floor = await stack.enter_async_context(await start_floor(workdir, args.catch_up_events))
        servers.append(("floor", floor, ""))
        if any(spec.kind == "sqlite" for spec in specs):
            for on_loop in (False, True):
                durable = await stack.enter_async_context(
                    await start_durable_floor(
                        workdir / f"durable-floor-{on_loop}.db", workdir, on_loop
                    )
                )
                servers.append((durable.name, durable, ""))
        issuer = bench_issuer(workdir) if "jwt" in args.workloads else None
        for spec in specs:
            url = stack.enter_context(spec.fresh(workdir, f"grpc-{spec.kind}"))
            reason = await supported(url)
            if reason is not None:
                report.notes.append(f"gRPC on {spec.kind}: {reason}")
                continue
            gateway = await stack.enter_async_context(await start_gateway(url, workdir))
            await restock(gateway.target)
            servers.append((spec.kind, gateway, ""))
            if issuer is not None:
                # A gateway of its own, on a store of its own: it refuses calls without
                # a token, and the others' figures stay those of a gateway without auth.
                url = stack.enter_context(spec.fresh(workdir, f"grpc-{spec.kind}-jwt"))
                options = ["--jwt-public-key", str(issuer.public_key_file)]
                verifying = await stack.enter_async_context(
                    await start_gateway(url, workdir, options=options)
                )
                await restock(verifying.target, issuer.token)
                servers.append((spec.kind, verifying, issuer.token))
        # hot, keyed and jwt beside create at every level, so that each pair sees the same
        # machine.
        plan = [
            (name, level)
            for level in args.concurrency
            for name in ("create", "hot", "keyed", "jwt")
            if name in args.workloads
        ]
        plan += [
            (name, args.workload_concurrency)
            for name in ("cancel", "mixed")
            if name in args.workloads
        ]
        gateways = {spec.kind for spec in specs}
        rounds: dict[tuple[str, str, int], list[LoadResult]] = {}
        for number in range(1, args.rounds + 1):
            if args.rounds > 1:
                print(f"round {number} of {args.rounds}", file=sys.stderr)
            for name, level in plan:
                for label, server, token in servers:
                    if not _runs_on(name, label in gateways, bool(token)):
                        continue
                    load = LoadSpec(
                        target=server.target,
                        workload=name,
                        concurrency=level,
                        duration=args.duration,
                        warmup=args.warmup,
                        processes=args.processes,
                        token=token,
                    )
                    result = await asyncio.to_thread(run_load, load, label, server.cpu_seconds)
                    _progress(result)
                    result = dataclasses.replace(result, round_number=number)
                    rounds.setdefault((label, name, level), []).append(result)
        if args.rounds == 1:
            report.load.extend(results[0] for results in rounds.values())
        else:
            report.load.extend(median_round(results) for results in rounds.values())
            report.load_rounds.extend(r for results in rounds.values() for r in results)


def _runs_on(workload: str, gateway: bool, verifies_tokens: bool) -> bool:
    """Whether ``workload`` runs on a server: the floors have no products, keep no command
    ids and check no token (their create run is their hot, keyed and jwt run); only
    ``jwt`` calls a gateway that verifies tokens, and only it."""
    if workload == "jwt" or verifies_tokens:
        return workload == "jwt" and verifies_tokens
    return gateway or workload not in ("hot", "keyed")


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
                await asyncio.to_thread(quiet_disks, specs)
                result = await gateway_commands(url, spec.kind, callers, args.duration, args.warmup)
            print(
                f"  gateway {spec.kind} x{callers}: {result.commands_per_s:,.0f} commands/s",
                file=sys.stderr,
            )
            report.inprocess.append(result)
        if spec.kind == "memory":
            continue  # eventsourcing's in-memory store is no durable backend to compare with
        with spec.fresh(workdir, f"inprocess-{spec.kind}-eventsourcing") as url:
            await asyncio.to_thread(quiet_disks, specs)
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


async def run_subscriptions(
    args: argparse.Namespace, specs: list[StoreSpec], workdir: Path, report: Report
) -> None:
    print("Subscriptions: catch-up and fan-out", file=sys.stderr)
    with subscriptions.client_pool() as pool:
        floor_measured = False
        for spec in specs:
            if spec.kind == "memory":
                report.notes.append(
                    "catch-up on memory: a memory store cannot be filled before the gateway "
                    "starts (it lives in the gateway's process)"
                )
                continue
            with spec.fresh(workdir, f"catch-up-{spec.kind}") as url:
                reason = await supported(url)
                if reason is not None:
                    report.notes.append(f"subscriptions on {spec.kind}: {reason}")
                    continue
                if not floor_measured:
                    async with await start_floor(workdir, args.catch_up_events) as floor:
                        result = await subscriptions.measure_catch_up_floor(
                            floor, args.catch_up_events, pool
                        )
                    report.catch_up.append(result)
                    floor_measured = True
                    print(f"  catch-up floor: {result.events_per_s:,.0f} events/s", file=sys.stderr)
                result = await subscriptions.measure_catch_up(
                    url, spec.kind, args.catch_up_events, workdir, pool
                )
            report.catch_up.append(result)
            print(
                f"  catch-up {spec.kind}: {result.events_per_s:,.0f} events/s, "
                f"peak RSS {result.peak_rss_mb:.0f} MB",
                file=sys.stderr,
            )
    for spec in specs if args.subscribers > 0 else ():
        with spec.fresh(workdir, f"fan-out-{spec.kind}") as url:
            if await supported(url) is not None:
                continue
            async with await start_gateway(url, workdir) as gateway:
                await restock(gateway.target)
                load = LoadSpec(
                    target=gateway.target,
                    workload="create",
                    concurrency=args.workload_concurrency,
                    duration=args.duration,
                    warmup=args.warmup,
                    processes=args.processes,
                )
                fan_out = await subscriptions.measure_fan_out(
                    gateway, spec.kind, args.subscribers, load
                )
        report.fan_out.append(fan_out)
        print(
            f"  fan-out {spec.kind}: {fan_out.subscribers} subscribers, "
            f"{fan_out.create_calls_per_s:,.0f} creates/s "
            f"(alone {fan_out.create_calls_per_s_without:,.0f}), "
            f"delivered {fan_out.delivered_min:,}-{fan_out.delivered_max:,} of "
            f"{fan_out.events_committed:,}, peak RSS {fan_out.rss_peak_mb:.0f} MB",
            file=sys.stderr,
        )


async def run_stream_length(
    args: argparse.Namespace, specs: list[StoreSpec], workdir: Path, report: Report
) -> None:
    """bench/stream_length.py's measurements, in process: the cache on (SQLite); a cold
    start with and without snapshots, and verify's rate, on each durable store."""
    print("Stream length: CreateOrder on a fresh hot product against a long one", file=sys.stderr)
    folder = workdir / "stream-length"
    folder.mkdir(exist_ok=True)
    short, longer = await stream_length.measure(
        folder, (stream_length.SHORT, args.stream_events), True, args.stream_orders
    )
    result = StreamLengthResult(
        "sqlite", short.latency.p50_ms, longer.latency.p50_ms, longer.stream_length
    )
    print(
        f"  p50 {result.fresh_p50_ms:.2f} ms at {short.stream_length} events, "
        f"{result.long_p50_ms:.2f} ms at {result.stream_events:,}",
        file=sys.stderr,
    )
    report.stream_length.append(result)

    intervals = (0, *args.snapshot_intervals)
    for spec in specs:
        if spec.kind == "memory":
            continue  # nothing to restart from
        with ExitStack() as stores:
            urls = [stores.enter_context(spec.fresh(folder, f"cold-{n}")) for n in intervals]
            colds = await stream_length.measure_cold_start(
                urls, args.stream_events, intervals, args.cold_starts, COLD_START_WARM_ORDERS
            )
        for cold in colds:
            report.cold_start.append(
                ColdStartResult(
                    spec.kind,
                    cold.stream_length,
                    cold.snapshot_interval,
                    cold.cold_ms,
                    cold.warm_p50_ms,
                    cold.cold_cpu_ms,
                    cold.warm_cpu_ms,
                    cold.taking_mean_ms,
                    cold.snapshot_write_ms,
                )
            )
            snapshots = f"every {cold.snapshot_interval}" if cold.snapshot_interval else "off"
            print(
                f"  cold start on {spec.kind}, snapshots {snapshots}:"
                f" {cold.cold_ms:.2f} ms against {cold.warm_p50_ms:.2f} ms warm",
                file=sys.stderr,
            )
    for spec in specs:
        if spec.kind == "memory" or not args.verify_events:
            continue
        with spec.fresh(workdir, f"verify-{spec.kind}") as url:
            await verify_rate.build_log(url, args.verify_events)
            checked = await verify_rate.measure(url)
        if not checked.ok:
            raise SystemExit(
                f"verify found the benchmark's own log inconsistent: {checked.lines()}"
            )
        report.verify.append(VerifyResult(spec.kind, checked.events, checked.seconds))
        print(
            f"  verify on {spec.kind}: {checked.events:,} events in {checked.seconds:.1f} s",
            file=sys.stderr,
        )


async def run_replicas(
    args: argparse.Namespace, specs: list[StoreSpec], workdir: Path, report: Report
) -> None:
    postgres = [spec for spec in specs if spec.kind == "postgresql"]
    if not postgres:
        report.notes.append("replicas: needs a --store postgresql://… server")
        return
    for spread, what in (("hot", "one hot product"), ("hot-set", "a set of hot products")):
        print(f"Replicas: two gateways on one PostgreSQL, {what}", file=sys.stderr)
        with postgres[0].fresh(workdir, f"replicas-{spread}") as url:
            reason = await supported(url)
            if reason is not None:
                report.notes.append(f"replicas: {reason}")
                return
            result = await replicas.measure(
                url,
                workdir,
                args.replica_callers,
                args.replica_duration,
                args.warmup,
                spread,
                args.replicas_load_generator,
            )
        for load in [result.alone, result.alone_half, *result.replicas]:
            _progress(load)
        report.replicas.append(result)


async def run_workers(
    args: argparse.Namespace, specs: list[StoreSpec], workdir: Path, report: Report
) -> None:
    print("Workers: serve --workers 2 against --workers 1, interleaved", file=sys.stderr)
    for spec in specs:
        if spec.kind == "memory":
            report.notes.append("workers on memory: memory:// serves from one process only")
            continue
        reason = await workers.measure(
            spec,
            workdir,
            args.duration,
            args.warmup,
            args.workers_processes,
            args.workers_rounds,
            report.workers,
            report.delivery,
            args.workers_load_generator,
        )
        if reason is not None:
            report.notes.append(f"workers on {spec.kind}: {reason}")


async def run_consumer_groups(
    args: argparse.Namespace, specs: list[StoreSpec], workdir: Path, report: Report
) -> None:
    print("Consumer groups: backlog against Subscribe, then live under load", file=sys.stderr)
    for spec in specs:
        if spec.kind == "memory":
            report.notes.append(
                "consumer groups on memory: a memory store cannot be filled before the "
                "gateway starts"
            )
            continue
        report.group_drain += await consumer_groups.measure_backlog(
            spec,
            args.group_events,
            (1, 2, 4),
            args.group_rounds,
            workdir,
            lambda r: print(f"  {consumer_groups.drain_line(r)}", file=sys.stderr, flush=True),
        )
        load = LoadSpec(
            target="",
            workload="create",
            concurrency=args.workload_concurrency,
            duration=args.duration,
            warmup=args.warmup,
            processes=args.processes,
        )
        report.group_live += await consumer_groups.measure_live(
            spec,
            (1, 2, 4),
            args.group_members,
            load,
            workdir,
            lambda r: print(f"  {consumer_groups.live_line(r)}", file=sys.stderr, flush=True),
        )


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
            "workloads": args.workloads,
            "workload_concurrency": args.workload_concurrency,
            "duration": args.duration,
            "warmup": args.warmup,
            "client_processes": args.processes,
            "inprocess_concurrency": args.inprocess_concurrency,
            "replica_callers": args.replica_callers,
            "replica_duration": args.replica_duration,
        }
    )
    with tempfile.TemporaryDirectory(prefix="order-gateway-bench-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        if "grpc" in sections:
            await run_grpc(args, specs, workdir, report)
        if "inprocess" in sections:
            await run_inprocess(args, specs, workdir, report)
        if "subscriptions" in sections:
            await run_subscriptions(args, specs, workdir, report)
        if "stream-length" in sections:
            await run_stream_length(args, specs, workdir, report)
        if "replicas" in sections:
            await run_replicas(args, specs, workdir, report)
        if "workers" in sections:
            await run_workers(args, specs, workdir, report)
        if "consumer-groups" in sections:
            await run_consumer_groups(args, specs, workdir, report)
    report.conditions_after = conditions()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.subscribers < 0:
        parser.error("--subscribers must be 0 or more")
    report = asyncio.run(run(args))
    report.save(args.json)
    print_report(report, sys.stdout)
    print_verdicts(evaluate(report), sys.stdout)
    print(f"\nresults: {args.json}")
    if report.load:
        print(f"plot: {plot_load(report, args.plot)}")
    return 0
