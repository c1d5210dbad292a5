"""The gateway's performance targets, judged against one run's figures.

These are benchmark outcomes, printed PASS or FAIL; a target whose figures the run did
not take (a store not given, a section skipped) is NOT MEASURED, never PASS.

The gRPC targets are ratios to the durable floors measured in the same run: a gateway that
makes each command durable cannot beat a server that stores nothing by less than an fsync,
so the bare floor's ratio is printed beside them as context only.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from bench.report import Report, group_ratios
from bench.servers import DURABLE_FLOOR, DURABLE_FLOORS
from bench.stats import LoadResult
from domain.snapshots import DEFAULT_INTERVAL

TARGET_CONCURRENCY = 16
THROUGHPUT_FACTOR = 0.8
LATENCY_FACTOR = 1.3
CPU_FACTOR = 1.4
RSS_LIMIT_MB = 200.0
WORKERS_CONCURRENCY = 32
WORKERS_SPEEDUP = 1.25
WORKERS_LATENCY_FACTOR = 1.10
DELIVERY_P99_MS = 10.0


@dataclass(frozen=True)
class Verdict:
    target: str
    outcome: str
    """"PASS", "FAIL" or "NOT MEASURED"."""
    detail: str


def _judge(target: str, passed: bool | None, detail: str) -> Verdict:
    """``passed`` is None when the run did not take the figures the target needs."""
    if passed is None:
        return Verdict(target, "NOT MEASURED", detail)
    return Verdict(target, "PASS" if passed else "FAIL", detail)


def _bare_floor_context(report: Report, gateway: LoadResult, by_latency: bool) -> str:
    """The ratio to the bare floor, which stores nothing: context, not the target."""
    floor = report.floor(gateway.workload, gateway.concurrency)
    if floor is None:
        return ""
    if by_latency:
        if not floor.latency.p50_ms:
            return ""
        return f" (bare floor: {gateway.latency.p50_ms / floor.latency.p50_ms:.2f} x)"
    if not floor.calls_per_s:
        return ""
    return f" (bare floor: {gateway.calls_per_s / floor.calls_per_s:.2f} x)"


def _calls(result: LoadResult) -> float:
    return result.calls_per_s


def _p50(result: LoadResult) -> float:
    return result.latency.p50_ms


def _cpu(result: LoadResult) -> float:
    return result.server_cpu_ms_per_call


@dataclass(frozen=True)
class _Ratio:
    """The gateway's figure against its base's: with ``--rounds``, the median of the
    rounds' own ratios (each round's gateway against the base measured beside it)."""

    value: float
    rounds: list[float]

    def detail(self) -> str:
        if not self.rounds:
            return ""
        low, high = min(self.rounds), max(self.rounds)
        return f"; {len(self.rounds)} rounds: {low:.2f}-{high:.2f} x, median {self.value:.2f} x"


def _ratio(
    report: Report,
    gateway: LoadResult,
    base: LoadResult,
    bases: tuple[str, ...],
    figure: Callable[[LoadResult], float],
) -> _Ratio:
    """``gateway``'s ``figure`` against ``base``'s; with rounds, each round's gateway
    against the lowest of ``bases`` by ``figure`` in that round."""
    per_round: list[float] = []
    for mine in report.rounds_of(gateway.server, gateway.workload, gateway.concurrency):
        beside = [
            r
            for name in bases
            for r in report.rounds_of(name, gateway.workload, gateway.concurrency)
            if r.round_number == mine.round_number and figure(r)
        ]
        if beside:
            per_round.append(figure(mine) / min(figure(r) for r in beside))
    if per_round:
        return _Ratio(statistics.median(per_round), per_round)
    return _Ratio(figure(gateway) / figure(base), [])


def _throughput_vs_durable_floor(report: Report) -> Verdict:
    target = (
        f"CreateOrder on durable SQLite at {TARGET_CONCURRENCY} concurrent "
        f">= {THROUGHPUT_FACTOR:g} x the group-commit durable floor"
    )
    gateway = report.find_load("sqlite", "create", TARGET_CONCURRENCY)
    durable = report.find_load(DURABLE_FLOOR, "create", TARGET_CONCURRENCY)
    if gateway is None or durable is None or not durable.calls_per_s:
        return _judge(target, None, f"needs --store sqlite and concurrency {TARGET_CONCURRENCY}")
    ratio = _ratio(report, gateway, durable, (DURABLE_FLOOR,), _calls)
    return _judge(
        target,
        ratio.value >= THROUGHPUT_FACTOR,
        f"{gateway.calls_per_s:,.0f} vs {durable.calls_per_s:,.0f} calls/s = "
        f"{gateway.calls_per_s / durable.calls_per_s:.2f} x"
        f"{_bare_floor_context(report, gateway, by_latency=False)}{ratio.detail()}",
    )


def _latency_vs_durable_floor(report: Report) -> Verdict:
    target = (
        "CreateOrder on durable SQLite at 1 concurrent: "
        f"p50 <= {LATENCY_FACTOR:g} x the best durable floor's"
    )
    gateway = report.find_load("sqlite", "create", 1)
    durable = report.best_durable_floor("create", 1)
    if gateway is None or durable is None or not durable.latency.p50_ms:
        return _judge(target, None, "needs --store sqlite and concurrency 1")
    ratio = _ratio(report, gateway, durable, DURABLE_FLOORS, _p50)
    context = _bare_floor_context(report, gateway, by_latency=True)
    return _judge(
        target,
        ratio.value <= LATENCY_FACTOR,
        f"p50 {gateway.latency.p50_ms:.2f} vs {durable.latency.p50_ms:.2f} ms "
        f"({durable.server}) = {gateway.latency.p50_ms / durable.latency.p50_ms:.2f} x"
        f"{context}{ratio.detail()}",
    )


def _cpu_vs_durable_floor(report: Report) -> Verdict:
    target = (
        f"server CPU per CreateOrder on SQLite at {TARGET_CONCURRENCY} concurrent "
        f"<= {CPU_FACTOR:g} x the group-commit durable floor's"
    )
    gateway = report.find_load("sqlite", "create", TARGET_CONCURRENCY)
    durable = report.find_load(DURABLE_FLOOR, "create", TARGET_CONCURRENCY)
    if gateway is None or durable is None or not durable.server_cpu_ms_per_call:
        return _judge(target, None, f"needs --store sqlite and concurrency {TARGET_CONCURRENCY}")
    ratio = _ratio(report, gateway, durable, (DURABLE_FLOOR,), _cpu)
    return _judge(
        target,
        ratio.value <= CPU_FACTOR,
        f"{gateway.server_cpu_ms_per_call:.3f} vs {durable.server_cpu_ms_per_call:.3f} ms "
        f"= {gateway.server_cpu_ms_per_call / durable.server_cpu_ms_per_call:.2f} x"
        f"{ratio.detail()}",
    )


def _inprocess(backend: str, factor: float) -> Callable[[Report], Verdict]:
    def judge(report: Report) -> Verdict:
        target = f"in-process on {backend} >= {factor:g} x eventsourcing"
        base = report.eventsourcing(backend)
        ours = max(
            (r for r in report.inprocess if r.system == "gateway" and r.backend == backend),
            key=lambda r: r.commands_per_s,
            default=None,
        )
        if base is None or ours is None or not base.commands_per_s:
            return _judge(target, None, f"needs --store {backend} and the inprocess section")
        ratio = ours.commands_per_s / base.commands_per_s
        return _judge(
            target,
            ratio >= factor,
            f"{ours.commands_per_s:,.0f} ({ours.concurrency} callers) vs "
            f"{base.commands_per_s:,.0f} commands/s = {ratio:.1f} x",
        )

    return judge


def _catch_up(report: Report) -> Verdict:
    target = "subscription catch-up >= 0.7 x its floor"
    floor = next((r for r in report.catch_up if r.server == "floor"), None)
    gateway = min(
        (r for r in report.catch_up if r.server != "floor"),
        key=lambda r: r.events_per_s,
        default=None,
    )
    if floor is None or gateway is None or not floor.events_per_s:
        return _judge(target, None, "needs the subscriptions section on a durable store")
    ratio = gateway.events_per_s / floor.events_per_s
    return _judge(
        target,
        ratio >= 0.7,
        f"{gateway.server}: {gateway.events_per_s:,.0f} vs {floor.events_per_s:,.0f} "
        f"events/s = {ratio:.2f} x",
    )


LONG_STREAM = 100_000
"""Events in the product stream that the stream-length targets are set for: a run with a
shorter one (``--stream-events``) measures them not."""


def _stream_length(report: Report) -> Verdict:
    target = "CreateOrder latency with a 100,000-event hot product stream within 10% of fresh"
    if not report.stream_length:
        return _judge(target, None, "needs the stream-length section")
    runs = [r for r in report.stream_length if r.stream_events >= LONG_STREAM]
    if not runs:
        shortest = min(r.stream_events for r in report.stream_length)
        return _judge(target, None, f"this run's stream had {shortest:,} events")
    worst = max(runs, key=lambda r: r.ratio)
    return _judge(
        target,
        worst.ratio <= 1.10,
        f"{worst.store}: p50 {worst.long_p50_ms:.2f} vs {worst.fresh_p50_ms:.2f} ms "
        f"= {worst.ratio:.2f} x",
    )


def _cold_start(report: Report) -> Verdict:
    target = (
        f"first order on a 100,000-event product after a restart <= 2 x a warm one's"
        f" (snapshots every {DEFAULT_INTERVAL})"
    )
    runs = [r for r in report.cold_start if r.snapshot_interval == DEFAULT_INTERVAL]
    if not runs:
        return _judge(target, None, f"needs the stream-length section with {DEFAULT_INTERVAL}")
    if all(r.stream_events < LONG_STREAM for r in runs):
        shortest = min(r.stream_events for r in runs)
        return _judge(target, None, f"this run's stream had {shortest:,} events")
    runs = [r for r in runs if r.stream_events >= LONG_STREAM]
    worst = max(runs, key=lambda r: r.ratio)
    return _judge(
        target,
        worst.ratio <= 2.0,
        f"{worst.store}: {worst.cold_ms:.2f} vs {worst.warm_p50_ms:.2f} ms = {worst.ratio:.2f} x",
    )


def _verify_rate(report: Report) -> Verdict:
    target = "verify checks 1,000,000 events in under a minute (>= 16,667 events/s)"
    if not report.verify:
        return _judge(target, None, "needs the stream-length section with --verify-events")
    slowest = min(report.verify, key=lambda r: r.events_per_s)
    return _judge(
        target,
        slowest.events_per_s >= 1_000_000 / 60,
        f"{slowest.store}: {slowest.events_per_s:,.0f} events/s over {slowest.events:,}",
    )


def _fan_out_rss(report: Report) -> Verdict:
    target = f"gateway RSS with 200 subscribers < {RSS_LIMIT_MB:.0f} MB"
    runs = [r for r in report.fan_out if r.subscribers >= 200]
    if not runs:
        return _judge(target, None, "needs the subscriptions section with 200 subscribers")
    worst = max(runs, key=lambda r: r.rss_peak_mb)
    return _judge(
        target,
        worst.rss_peak_mb < RSS_LIMIT_MB,
        f"{worst.store}: peak {worst.rss_peak_mb:.0f} MB",
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _workers_throughput(store: str) -> Callable[[Report], Verdict]:
    def judge(report: Report) -> Verdict:
        target = (
            f"CreateOrder on {store} at {WORKERS_CONCURRENCY} concurrent: --workers 2 "
            f">= {WORKERS_SPEEDUP:g} x --workers 1"
        )
        one = report.workers_load(store, 1, WORKERS_CONCURRENCY)
        two = report.workers_load(store, 2, WORKERS_CONCURRENCY)
        if not one or not two or not _mean([r.calls_per_s for r in one]):
            return _judge(target, None, f"needs --store {store} and the workers section")
        base, ours = _mean([r.calls_per_s for r in one]), _mean([r.calls_per_s for r in two])
        ratio = ours / base
        return _judge(
            target,
            ratio >= WORKERS_SPEEDUP,
            f"{ours:,.0f} vs {base:,.0f} calls/s = {ratio:.2f} x (mean of {len(two)} rounds; "
            f"server CPU {_mean([r.server_cpu_ms_per_call for r in two]):.3f} vs "
            f"{_mean([r.server_cpu_ms_per_call for r in one]):.3f} ms/call; load generator "
            f"{two[0].load_generator}, {_mean([r.client_cpu_ms_per_call for r in two]):.3f}"
            " ms/call)",
        )

    return judge


def _workers_latency(store: str) -> Callable[[Report], Verdict]:
    def judge(report: Report) -> Verdict:
        target = f"CreateOrder on {store} at 1 concurrent: --workers 2 p50 within 10% of 1's"
        one = report.workers_load(store, 1, 1)
        two = report.workers_load(store, 2, 1)
        if not one or not two or not _mean([r.latency.p50_ms for r in one]):
            return _judge(target, None, f"needs --store {store} and the workers section")
        base = _mean([r.latency.p50_ms for r in one])
        ours = _mean([r.latency.p50_ms for r in two])
        ratio = ours / base
        return _judge(
            target,
            ratio <= WORKERS_LATENCY_FACTOR,
            f"p50 {ours:.2f} vs {base:.2f} ms = {ratio:.2f} x (mean of {len(two)} rounds)",
        )

    return judge


def _cross_worker_delivery(report: Report) -> Verdict:
    target = f"live delivery across workers: p99 <= {DELIVERY_P99_MS:g} ms"
    if not report.delivery:
        return _judge(target, None, "needs the workers section on a durable store")
    # Commit to subscriber, measured from the creator's answer (see bench.workers).
    worst = max(report.delivery, key=lambda r: r.after_answer.p99_ms)
    return _judge(
        target,
        worst.after_answer.p99_ms <= DELIVERY_P99_MS and worst.missing == 0,
        f"{worst.store}: p99 {worst.after_answer.p99_ms:.2f} ms after the creator's answer "
        f"({worst.from_handling.p99_ms:.2f} ms from handling, an upper bound), "
        f"{worst.missing} missing",
    )


def _hot(store: str, factor: float) -> Callable[[Report], Verdict]:
    """A hot product against orders spread over many, on one store at 16 concurrent."""

    def judge(report: Report) -> Verdict:
        target = (
            f"hot on {store} at {TARGET_CONCURRENCY} concurrent: >= {factor:g} x create's "
            "calls/s, CPU/call within 10 %, p99 <= 1.5 x"
        )
        hot = report.find_load(store, "hot", TARGET_CONCURRENCY)
        create = report.find_load(store, "create", TARGET_CONCURRENCY)
        if hot is None or create is None or not create.calls_per_s:
            return _judge(target, None, f"needs --store {store}, concurrency 16, create and hot")
        ratio = hot.calls_per_s / create.calls_per_s
        cpu = hot.server_cpu_ms_per_call / (create.server_cpu_ms_per_call or 1.0)
        p99 = hot.latency.p99_ms / create.latency.p99_ms
        return _judge(
            target,
            ratio >= factor and cpu <= 1.10 and p99 <= 1.5,
            f"{hot.calls_per_s:,.0f} vs {create.calls_per_s:,.0f} calls/s = {ratio:.2f} x, "
            f"CPU {cpu:.2f} x, p99 {p99:.2f} x",
        )

    return judge


def _replicas(report: Report) -> Verdict:
    target = (
        "two PostgreSQL replicas, one hot product: no ABORTED, each >= 0.3 x the total, "
        "total >= one replica alone, p99 <= 100 ms"
    )
    result = next((r for r in reversed(report.replicas) if r.workload == "hot"), None)
    if result is None:
        return _judge(target, None, "needs the replicas section and --store postgresql://…")
    aborted = result.errors.get("ABORTED", 0)
    p99 = max(r.latency.p99_ms for r in result.replicas)
    total = result.total_calls_per_s
    return _judge(
        target,
        aborted == 0
        and result.smallest_share >= 0.3
        and total >= result.alone.calls_per_s
        and p99 <= 100.0,
        f"ABORTED {aborted}, smallest share {result.smallest_share:.2f}, total {total:,.0f} vs "
        f"alone {result.alone.calls_per_s:,.0f} calls/s, worst p99 {p99:.1f} ms, "
        f"load generator {result.alone.load_generator}",
    )


GROUP_ONE_MEMBER_FACTOR = 0.5
GROUP_MANY_MEMBERS = 100


def _group_stores(report: Report) -> list[str]:
    return sorted({r.store for r in report.group_drain})


def _group_one_member(report: Report) -> Verdict:
    target = (
        f"consumer group, 1 member, draining a backlog >= {GROUP_ONE_MEMBER_FACTOR:g} x "
        "Subscribe's catch-up"
    )
    judged = [
        (store, group_ratios(report.group_drain, store, 1)) for store in _group_stores(report)
    ]
    judged = [(store, ratios) for store, ratios in judged if ratios]
    if not judged:
        return _judge(target, None, "needs the consumer-groups section with 1 member")
    store, ratios = min(judged, key=lambda item: _mean(item[1]))
    return _judge(
        target,
        _mean(ratios) >= GROUP_ONE_MEMBER_FACTOR,
        f"{store}: {_mean(ratios):.2f} x (mean of {len(ratios)} rounds: "
        f"{', '.join(f'{r:.2f}' for r in ratios)})",
    )


def _group_four_members(report: Report) -> Verdict:
    target = "consumer group, 4 members, draining a backlog >= 1 member's events/s"
    worst: tuple[float, str, float, float] | None = None
    for store in _group_stores(report):
        one = _mean(group_ratios(report.group_drain, store, 1))
        four = _mean(group_ratios(report.group_drain, store, 4))
        if one and four and (worst is None or four / one < worst[0]):
            worst = (four / one, store, four, one)
    if worst is None:
        return _judge(target, None, "needs the consumer-groups section with 1 and 4 members")
    ratio, store, four, one = worst
    return _judge(
        target,
        ratio >= 1.0,
        f"{store}: {four:.2f} vs {one:.2f} x Subscribe (means over rounds) = {ratio:.2f} x",
    )


def _group_rss(report: Report) -> Verdict:
    target = (
        f"gateway RSS with a consumer group of {GROUP_MANY_MEMBERS} members under load "
        f"< {RSS_LIMIT_MB:.0f} MB"
    )
    runs = [r for r in report.group_live if r.members >= GROUP_MANY_MEMBERS]
    if not runs:
        return _judge(target, None, f"needs the consumer-groups section with {GROUP_MANY_MEMBERS}")
    worst = max(runs, key=lambda r: r.rss_peak_mb)
    return _judge(
        target,
        worst.rss_peak_mb < RSS_LIMIT_MB,
        f"{worst.store}: peak {worst.rss_peak_mb:.0f} MB ({worst.rss_idle_mb:.0f} MB idle), "
        f"{worst.members} members, all acked {worst.catch_up_seconds:.1f} s after the load",
    )


JUDGES: tuple[Callable[[Report], Verdict], ...] = (
    _throughput_vs_durable_floor,
    _latency_vs_durable_floor,
    _cpu_vs_durable_floor,
    _inprocess("sqlite", 5),
    _inprocess("postgresql", 10),
    _catch_up,
    _stream_length,
    _cold_start,
    _verify_rate,
    _fan_out_rss,
    _workers_throughput("sqlite"),
    _workers_throughput("postgresql"),
    _workers_latency("sqlite"),
    _workers_latency("postgresql"),
    _cross_worker_delivery,
    _hot("sqlite", 0.9),
    _hot("postgresql", 0.8),
    _replicas,
    _group_one_member,
    _group_four_members,
    _group_rss,
)


def evaluate(report: Report) -> list[Verdict]:
    return [judge(report) for judge in JUDGES]


def print_verdicts(verdicts: list[Verdict], out: TextIO) -> None:
    out.write("\nTargets (benchmarks, not tests)\n")
    for verdict in verdicts:
        out.write(f"  {verdict.outcome:<12} {verdict.target}: {verdict.detail}\n")
