"""Everything one benchmark run measured, printed as tables and saved as JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

from bench.inprocess import InProcessResult
from bench.replicas import ReplicaResult
from bench.servers import DURABLE_FLOORS, servers_event_loop
from bench.stats import LoadResult
from bench.workers import WORKER_COUNTS, DeliveryResult, ceiling, delivery_summary, label
from bench.workload import HOT_SET


@dataclass(frozen=True)
class CatchUpResult:
    server: str
    """"floor" or the gateway's store kind."""
    events: int
    seconds: float
    server_cpu_us_per_event: float
    peak_rss_mb: float = 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class FanOutResult:
    store: str
    subscribers: int
    create_calls_per_s: float
    create_calls_per_s_without: float
    """The same CreateOrder load with no subscriber, for comparison."""
    events_committed: int
    delivered_min: int
    """Fewest events any one subscriber received (each should get every committed one)."""
    delivered_max: int
    rss_idle_mb: float
    rss_peak_mb: float


@dataclass(frozen=True)
class StreamLengthResult:
    store: str
    fresh_p50_ms: float
    long_p50_ms: float
    stream_events: int

    @property
    def ratio(self) -> float:
        return self.long_p50_ms / self.fresh_p50_ms if self.fresh_p50_ms else 0.0


@dataclass
class ColdStartResult:
    store: str
    stream_events: int
    snapshot_interval: int
    """0: snapshots off."""
    cold_ms: float
    warm_p50_ms: float
    cold_cpu_ms: float = 0.0
    warm_cpu_ms: float = 0.0
    """The process's CPU time over the cold order and the warm ones (medians)."""
    taking_mean_ms: float = 0.0
    """Warm orders' mean latency while snapshots are taken every interval (none at 0)."""
    snapshot_write_ms: float = 0.0
    """Median time of one background snapshot write."""

    @property
    def ratio(self) -> float:
        return self.cold_ms / self.warm_p50_ms if self.warm_p50_ms else 0.0


@dataclass
class VerifyResult:
    store: str
    events: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class GroupDrainResult:
    """One drain of the backlog: by Subscribe (``members`` 0) or by a new group."""

    store: str
    round: int
    members: int
    events: int
    seconds: float
    peak_rss_mb: float
    server_cpu_us_per_event: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class GroupLiveResult:
    """A group following CreateOrder load."""

    store: str
    members: int
    partitions: int
    committed_events: int
    acked_events: int
    """Acks the members sent (a redelivered event is acked again)."""
    load_seconds: float
    lag_at_end: int
    """Events committed but not yet below the group's checkpoint when the load ended."""
    catch_up_seconds: float
    """From the load's end until the checkpoint reached the head."""
    create_calls_per_s: float
    rss_idle_mb: float
    rss_peak_mb: float

    @property
    def committed_per_s(self) -> float:
        return self.committed_events / self.load_seconds if self.load_seconds else 0.0


def group_ratios(drained: list[GroupDrainResult], store: str, members: int) -> list[float]:
    """Per round, the group's events/s over that round's Subscribe catch-up."""
    base = {r.round: r.events_per_s for r in drained if r.store == store and r.members == 0}
    return [
        r.events_per_s / base[r.round]
        for r in drained
        if r.store == store and r.members == members and base.get(r.round)
    ]


def print_consumer_groups(
    drained: list[GroupDrainResult], live: list[GroupLiveResult], out: TextIO
) -> None:
    if drained:
        out.write(
            "\nConsumer groups: draining the backlog (16 partitions, batched acks) against "
            "Subscribe's catch-up, interleaved by round\n"
        )
        base = {(r.store, r.round): r.events_per_s for r in drained if r.members == 0}
        _table(
            out,
            ["store", "round", "who", "events", "events/s", "x Subscribe", "srv CPU us/event",
             "peak RSS MB"],
            [
                [
                    r.store,
                    str(r.round),
                    f"{r.members} member{'s' * (r.members > 1)}" if r.members else "Subscribe",
                    f"{r.events:,}",
                    f"{r.events_per_s:,.0f}",
                    _ratio(r.events_per_s, base.get((r.store, r.round))),
                    f"{r.server_cpu_us_per_event:.0f}",
                    f"{r.peak_rss_mb:.0f}",
                ]
                for r in drained
            ],
        )  # fmt: skip
    if live:
        out.write("\nConsumer groups: live, following CreateOrder load\n")
        _table(
            out,
            ["store", "members", "partitions", "committed/s", "create/s", "lag at end",
             "all acked after s", "RSS idle MB", "RSS peak MB"],
            [
                [
                    r.store,
                    str(r.members),
                    str(r.partitions),
                    f"{r.committed_per_s:,.0f}",
                    f"{r.create_calls_per_s:,.0f}",
                    f"{r.lag_at_end:,}",
                    f"{r.catch_up_seconds:.1f}",
                    f"{r.rss_idle_mb:.0f}",
                    f"{r.rss_peak_mb:.0f}",
                ]
                for r in live
            ],
        )  # fmt: skip


def conditions() -> dict[str, Any]:
    """What the figures depend on besides the code: the machine and what else ran on it."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpus": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
        "event_loop": servers_event_loop(),
    }


@dataclass
class Report:
    settings: dict[str, Any] = field(default_factory=dict)
    conditions_before: dict[str, Any] = field(default_factory=conditions)
    conditions_after: dict[str, Any] = field(default_factory=dict)
    load: list[LoadResult] = field(default_factory=list)
    """One result per gRPC point: with ``--rounds`` above 1, the median of its rounds."""
    load_rounds: list[LoadResult] = field(default_factory=list)
    """With ``--rounds`` above 1, every round of every gRPC point."""
    inprocess: list[InProcessResult] = field(default_factory=list)
    catch_up: list[CatchUpResult] = field(default_factory=list)
    fan_out: list[FanOutResult] = field(default_factory=list)
    stream_length: list[StreamLengthResult] = field(default_factory=list)
    workers: list[LoadResult] = field(default_factory=list)
    """``serve --workers N`` load, ``server`` "<store> x<N>"; several rounds per point."""
    delivery: list[DeliveryResult] = field(default_factory=list)
    replicas: list[ReplicaResult] = field(default_factory=list)
    cold_start: list[ColdStartResult] = field(default_factory=list)
    verify: list[VerifyResult] = field(default_factory=list)
    group_drain: list[GroupDrainResult] = field(default_factory=list)
    group_live: list[GroupLiveResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Sections or stores not measured, and why."""

    def floor(self, workload: str, concurrency: int) -> LoadResult | None:
        return self.find_load("floor", workload, concurrency)

    def best_durable_floor(self, workload: str, concurrency: int) -> LoadResult | None:
        """Of the durable floors, the one with the lowest p50 (the latency target's base)."""
        measured = [
            r for name in DURABLE_FLOORS if (r := self.find_load(name, workload, concurrency))
        ]
        return min(measured, key=lambda r: r.latency.p50_ms, default=None)

    def rounds_of(self, server: str, workload: str, concurrency: int) -> list[LoadResult]:
        """Every round measured for one gRPC point, first first (none with one round)."""
        return [
            r
            for r in self.load_rounds
            if (r.server, r.workload, r.concurrency) == (server, workload, concurrency)
        ]

    def find_load(self, server: str, workload: str, concurrency: int) -> LoadResult | None:
        for result in self.load:
            if (result.server, result.workload, result.concurrency) == (
                server,
                workload,
                concurrency,
            ):
                return result
        return None

    def workers_load(
        self, store: str, workers: int, concurrency: int, workload: str = "create"
    ) -> list[LoadResult]:
        """Every round measured for one ``--workers`` point."""
        name = label(store, workers)
        point = (name, workload, concurrency)
        return [r for r in self.workers if (r.server, r.workload, r.concurrency) == point]

    def eventsourcing(self, backend: str) -> InProcessResult | None:
        return next(
            (r for r in self.inprocess if r.system == "eventsourcing" and r.backend == backend),
            None,
        )

    def to_json(self) -> dict[str, Any]:
        def plain(items: list[Any]) -> list[dict[str, Any]]:
            return [dataclasses.asdict(item) for item in items]

        return {
            "settings": self.settings,
            "conditions_before": self.conditions_before,
            "conditions_after": self.conditions_after,
            "load": plain(self.load),
            "load_rounds": plain(self.load_rounds),
            "inprocess": [
                {**dataclasses.asdict(r), "commands_per_s": r.commands_per_s}
                for r in self.inprocess
            ],
            "catch_up": [
                {**dataclasses.asdict(r), "events_per_s": r.events_per_s} for r in self.catch_up
            ],
            "fan_out": plain(self.fan_out),
            "stream_length": [
                {**dataclasses.asdict(r), "ratio": r.ratio} for r in self.stream_length
            ],
            "workers": plain(self.workers),
            "delivery": plain(self.delivery),
            "replicas": [
                {
                    **dataclasses.asdict(r),
                    "total_calls_per_s": r.total_calls_per_s,
                    "smallest_share": r.smallest_share,
                    "errors": r.errors,
                }
                for r in self.replicas
            ],
            "cold_start": [{**dataclasses.asdict(r), "ratio": r.ratio} for r in self.cold_start],
            "verify": [
                {**dataclasses.asdict(r), "events_per_s": r.events_per_s} for r in self.verify
            ],
            "group_drain": [
                {**dataclasses.asdict(r), "events_per_s": r.events_per_s} for r in self.group_drain
            ],
            "group_live": [
                {**dataclasses.asdict(r), "committed_per_s": r.committed_per_s}
                for r in self.group_live
            ],
            "notes": self.notes,
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _table(out: TextIO, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[n]) for row in [header, *rows]) for n in range(len(header))]
    for row in [header, *rows]:
        out.write("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        out.write("\n")


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


def print_load(report: Report, out: TextIO) -> None:
    if not report.load:
        return
    out.write("\ngRPC, closed loop (server CPU = the server process's CPU time per call)\n")
    rows = []
    for result in report.load:
        floor = report.floor(result.workload, result.concurrency)
        is_floor = result.server == "floor"
        rows.append(
            [
                result.workload,
                str(result.concurrency),
                result.server,
                f"{result.calls_per_s:,.0f}",
                f"{result.latency.p50_ms:.2f}",
                f"{result.latency.p90_ms:.2f}",
                f"{result.latency.p99_ms:.2f}",
                f"{result.server_cpu_ms_per_call:.3f}",
                ""
                if is_floor
                else _ratio(result.calls_per_s, floor.calls_per_s if floor else None),
                ""
                if is_floor
                else _ratio(result.latency.p50_ms, floor.latency.p50_ms if floor else None),
                ",".join(f"{k}={v}" for k, v in result.errors.items())
                + (" cut short" if result.cut_short else ""),
            ]
        )
    header = [
        "workload",
        "conc",
        "server",
        "calls/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "srv CPU ms/call",
        "calls/s vs floor",
        "p50 vs floor",
        "errors",
    ]
    _table(out, header, rows)
    sizes: dict[tuple[str, str], list[int]] = {}
    for result in report.load:
        for rpc, measured in result.response_bytes.items():
            sizes.setdefault((rpc, result.server), measured)
    out.write("response message sizes, bytes (one call; they vary by a byte or two): ")
    out.write("; ".join(f"{rpc} {server} {s}" for (rpc, server), s in sorted(sizes.items())))
    out.write("\n")
    print_durability_cost(report, out)


def print_durability_cost(report: Report, out: TextIO) -> None:
    """Each durable floor against the floor, and the SQLite gateway against the durable floor.

    The first ratio is what durability alone costs on this machine, whatever the gateway
    does; the second is the gateway's own cost on top of it.
    """
    rows = []
    for durable in report.load:
        if durable.server not in DURABLE_FLOORS:
            continue
        floor = report.floor(durable.workload, durable.concurrency)
        gateway = report.find_load("sqlite", durable.workload, durable.concurrency)
        rows.append(
            [
                durable.workload,
                str(durable.concurrency),
                durable.server,
                _ratio(durable.calls_per_s, floor.calls_per_s if floor else None),
                _ratio(durable.latency.p50_ms, floor.latency.p50_ms if floor else None),
                _ratio(gateway.calls_per_s, durable.calls_per_s) if gateway else "-",
                _ratio(gateway.latency.p50_ms, durable.latency.p50_ms) if gateway else "-",
            ]
        )
    if not rows:
        return
    out.write(
        "\nWhat durability alone costs: a durable floor = the floor + each command's events "
        "INSERTed and COMMITted to SQLite (WAL, synchronous=FULL), nothing else; committed "
        "in groups by a writer thread, or one by one on the event loop\n"
    )
    _table(
        out,
        [
            "workload",
            "conc",
            "durable floor",
            "calls/s vs floor",
            "p50 vs floor",
            "sqlite gateway calls/s vs durable floor",
            "p50 vs durable floor",
        ],
        rows,
    )


def print_inprocess(report: Report, out: TextIO) -> None:
    if not report.inprocess:
        return
    out.write("\nIn-process commands (create then cancel; no gRPC)\n")
    rows = []
    for result in report.inprocess:
        base = report.eventsourcing(result.backend)
        rows.append(
            [
                result.backend,
                result.system,
                str(result.concurrency),
                f"{result.commands:,}",
                f"{result.commands_per_s:,.0f}",
                ""
                if result.system == "eventsourcing"
                else _ratio(result.commands_per_s, base.commands_per_s if base else None),
            ]
        )
    _table(
        out,
        ["backend", "system", "callers", "commands", "commands/s", "vs eventsourcing"],
        rows,
    )


def print_subscriptions(report: Report, out: TextIO) -> None:
    if report.catch_up:
        out.write("\nSubscription catch-up (one subscriber, from position 0)\n")
        floor = next((r for r in report.catch_up if r.server == "floor"), None)
        _table(
            out,
            [
                "server",
                "events",
                "seconds",
                "events/s",
                "vs floor",
                "srv CPU us/event",
                "peak RSS MB",
            ],
            [
                [
                    r.server,
                    f"{r.events:,}",
                    f"{r.seconds:.1f}",
                    f"{r.events_per_s:,.0f}",
                    ""
                    if r.server == "floor"
                    else _ratio(r.events_per_s, floor.events_per_s if floor else None),
                    f"{r.server_cpu_us_per_event:.1f}",
                    f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb else "",
                ]
                for r in report.catch_up
            ],
        )
    if report.fan_out:
        out.write("\nSubscription fan-out (live subscribers while CreateOrder load runs)\n")
        _table(
            out,
            [
                "store",
                "subscribers",
                "create/s",
                "create/s alone",
                "events",
                "delivered min/max",
                "RSS idle MB",
                "RSS peak MB",
            ],
            [
                [
                    r.store,
                    str(r.subscribers),
                    f"{r.create_calls_per_s:,.0f}",
                    f"{r.create_calls_per_s_without:,.0f}",
                    f"{r.events_committed:,}",
                    f"{r.delivered_min:,}/{r.delivered_max:,}",
                    f"{r.rss_idle_mb:.0f}",
                    f"{r.rss_peak_mb:.0f}",
                ]
                for r in report.fan_out
            ],
        )


def print_stream_length(report: Report, out: TextIO) -> None:
    if not report.stream_length:
        return
    out.write("\nCreateOrder latency on a hot product: fresh stream against a long one\n")
    _table(
        out,
        ["store", "stream events", "fresh p50 ms", "long p50 ms", "long/fresh"],
        [
            [
                r.store,
                f"{r.stream_events:,}",
                f"{r.fresh_p50_ms:.2f}",
                f"{r.long_p50_ms:.2f}",
                f"{r.ratio:.2f}",
            ]
            for r in report.stream_length
        ],
    )
    if report.cold_start:
        out.write(
            "\nCold start: the first order on a long stream after a restart (empty cache),"
            " from the\nsnapshot furthest behind that the interval allows, against the warm"
            " orders after it,\nand the process's CPU time over each; the warm orders' mean"
            " while snapshots are taken every\ninterval, and one snapshot write's time\n"
        )
        _table(
            out,
            [
                "store",
                "stream events",
                "snapshots every",
                "cold ms",
                "warm p50 ms",
                "cold/warm",
                "CPU cold/warm ms",
                "mean taking them",
                "write ms",
            ],
            [
                [
                    r.store,
                    f"{r.stream_events:,}",
                    f"{r.snapshot_interval:,}" if r.snapshot_interval else "off",
                    f"{r.cold_ms:.2f}",
                    f"{r.warm_p50_ms:.2f}",
                    f"{r.ratio:.2f}",
                    f"{r.cold_cpu_ms:.2f}/{r.warm_cpu_ms:.2f}",
                    f"{r.taking_mean_ms:.2f}",
                    f"{r.snapshot_write_ms:.2f}",
                ]
                for r in report.cold_start
            ],
        )
    if report.verify:
        out.write("\norder-gateway verify: the whole log read and checked\n")
        _table(
            out,
            ["store", "events", "seconds", "events/s"],
            [
                [r.store, f"{r.events:,}", f"{r.seconds:.1f}", f"{r.events_per_s:,.0f}"]
                for r in report.verify
            ],
        )


def print_workers(report: Report, out: TextIO) -> None:
    if not report.workers:
        return
    generators = sorted({result.load_generator for result in report.workers})
    out.write(
        "\nserve --workers N, CreateOrder spread (create) and on one product (hot) "
        "(interleaved rounds; CPU ms per call: server = "
        "supervisor and workers; ceiling = this host's cores / (server + client + db CPU); "
        f"load generator: {', '.join(generators)})\n"
    )
    rows = []
    for result in report.workers:
        store, _, workers = result.server.rpartition(" x")
        base = None
        if int(workers) != WORKER_COUNTS[0]:
            # The same round's --workers 1 figure, measured just before this one.
            point = (result.concurrency, result.workload)
            ours = report.workers_load(store, int(workers), *point)
            bases = report.workers_load(store, WORKER_COUNTS[0], *point)
            round_index = next(n for n, r in enumerate(ours) if r is result)
            base = bases[round_index] if round_index < len(bases) else None
        rows.append(
            [
                result.server,
                result.workload,
                str(result.concurrency),
                f"{result.calls_per_s:,.0f}",
                f"{result.latency.p50_ms:.2f}",
                f"{result.latency.p99_ms:.2f}",
                f"{result.server_cpu_ms_per_call:.3f}",
                f"{result.supervisor_cpu_ms_per_call:.3f}"
                if result.supervisor_cpu_ms_per_call
                else "",
                f"{result.client_cpu_ms_per_call:.3f}",
                f"{result.database_cpu_ms_per_call:.3f}" if result.database_cpu_ms_per_call else "",
                f"{ceiling(result):,.0f}",
                _ratio(result.calls_per_s, base.calls_per_s) if base else "",
                ",".join(f"{k}={v}" for k, v in result.errors.items()),
            ]
        )
    _table(
        out,
        [
            "server",
            "workload",
            "conc",
            "calls/s",
            "p50 ms",
            "p99 ms",
            "srv CPU ms/call",
            "of it supervisor",
            "client CPU",
            "db CPU",
            "ceiling calls/s",
            "vs x1",
            "errors",
        ],
        rows,
    )
    for delivery in report.delivery:
        out.write(
            f"Live delivery across workers on {delivery.store}, {delivery.orders} orders: "
            f"{delivery_summary(delivery)}\n"
        )


def print_replicas(report: Report, out: TextIO) -> None:
    for result in report.replicas:
        spread = (
            "every order on one product"
            if result.workload == "hot"
            else f"orders spread over {HOT_SET} products"
        )
        out.write(
            f"\nTwo replicas on one PostgreSQL, {spread}, "
            f"{result.callers_per_replica} callers on each, {result.duration:.0f} s, "
            f"load generator {result.alone.load_generator}\n"
        )
        total = result.total_calls_per_s
        rows = [
            [
                r.server,
                str(r.concurrency),
                f"{r.calls_per_s:,.0f}",
                f"{r.calls_per_s / total:.2f}" if total and r in result.replicas else "",
                f"{r.latency.p50_ms:.2f}",
                f"{r.latency.p99_ms:.2f}",
                f"{r.server_cpu_ms_per_call:.3f}",
                ",".join(f"{k}={v}" for k, v in sorted(r.errors.items())) or "none",
            ]
            for r in [result.alone, result.alone_half, *result.replicas]
        ]
        rows.append(
            [
                "both replicas",
                str(2 * result.callers_per_replica),
                f"{total:,.0f}",
                "1.00",
                "",
                "",
                "",
                ",".join(f"{k}={v}" for k, v in sorted(result.errors.items())) or "none",
            ]
        )
        _table(
            out,
            [
                "server",
                "callers",
                "calls/s",
                "share",
                "p50 ms",
                "p99 ms",
                "srv CPU ms/call",
                "errors",
            ],
            rows,
        )


def print_report(report: Report, out: TextIO) -> None:
    print_load(report, out)
    print_inprocess(report, out)
    print_subscriptions(report, out)
    print_stream_length(report, out)
    print_workers(report, out)
    print_replicas(report, out)
    print_consumer_groups(report.group_drain, report.group_live, out)
    if report.notes:
        out.write("\nNot measured:\n")
        for note in report.notes:
            out.write(f"  - {note}\n")
    before, after = report.conditions_before, report.conditions_after
    out.write(
        f"\nConditions: {before.get('cpus')} CPUs, {before.get('platform')}, Python "
        f"{before.get('python')}, grpcio {before.get('grpcio')}, servers on "
        f"{before.get('event_loop', 'asyncio')}'s event loop; load average "
        f"{before.get('load_average')} at start, {after.get('load_average')} at end\n"
    )
