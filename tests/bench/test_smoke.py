"""The benchmark harness runs end to end and reports well-formed figures.

One short, low-concurrency run against memory:// (floor and gateway, in-process): it checks
the shape of what the benchmark reports, never how fast anything was. The targets are
judged from figures made up for the purpose.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.inprocess import InProcessResult
from bench.replicas import ReplicaResult
from bench.report import (
    CatchUpResult,
    ColdStartResult,
    FanOutResult,
    Report,
    StreamLengthResult,
    VerifyResult,
    print_report,
)
from bench.run import main
from bench.servers import DURABLE_FLOOR, DURABLE_FLOOR_ON_LOOP
from bench.stats import Latencies, LoadResult, median_round
from bench.targets import evaluate
from bench.workers import DeliveryResult, label
from domain.snapshots import DEFAULT_INTERVAL
from tests.bench_support import bench_report, made_up_load


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    folder = tmp_path_factory.mktemp("bench")
    results, plot = folder / "bench.json", folder / "bench.png"
    capture = folder / "stdout.txt"
    with capture.open("w") as out, pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdout", out)
        exit_code = main(
            [
                "--store",
                "memory",
                "--sections",
                "grpc,inprocess",
                "--workloads",
                "create,keyed,jwt",
                "--concurrency",
                "2",
                "--processes",
                "1",
                "--duration",
                "1",
                "--warmup",
                "0.2",
                "--rounds",
                "2",
                "--inprocess-concurrency",
                "2",
                "--workdir",
                str(folder / "work"),
                "--json",
                str(results),
                "--plot",
                str(plot),
            ]
        )
    assert exit_code == 0
    return json.loads(results.read_text()), capture.read_text(), plot


def test_load_results_pair_the_gateway_with_the_floor(
    run: tuple[dict[str, Any], str, Path],
) -> None:
    report, _, _ = run
    load = report["load"]
    assert sorted((r["server"], r["workload"], r["concurrency"]) for r in load) == [
        ("floor", "create", 2),
        ("memory", "create", 2),
        ("memory", "jwt", 2),  # on a gateway of its own, which refuses calls without one
        ("memory", "keyed", 2),
    ]
    for result in load:
        assert result["errors"] == {}
        assert result["calls"] > 0
        assert result["calls_per_s"] > 0
        latency = result["latency"]
        assert 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"]
        assert result["server_cpu_ms_per_call"] > 0


def test_every_point_is_the_median_of_its_interleaved_rounds(
    run: tuple[dict[str, Any], str, Path],
) -> None:
    report, _, _ = run
    rounds = report["load_rounds"]
    points = {(r["server"], r["workload"], r["concurrency"]) for r in report["load"]}
    for point in points:
        measured = [r for r in rounds if (r["server"], r["workload"], r["concurrency"]) == point]
        assert sorted(r["round_number"] for r in measured) == [1, 2]
        median = next(
            r for r in report["load"] if (r["server"], r["workload"], r["concurrency"]) == point
        )
        assert median["calls"] == sum(r["calls"] for r in measured)
        assert median["calls_per_s"] == pytest.approx(sum(r["calls_per_s"] for r in measured) / 2)


def test_floor_answers_with_messages_the_size_of_the_gateways(
    run: tuple[dict[str, Any], str, Path],
) -> None:
    report, _, _ = run
    sizes = {
        r["server"]: r["response_bytes"]["CreateOrder"]
        for r in report["load"]
        if r["workload"] == "create"
    }
    floor, gateway = sizes["floor"], sizes["memory"]
    assert len(floor) == len(gateway) == 2
    for floor_bytes, gateway_bytes in zip(floor, gateway, strict=True):
        # Timestamps and counters vary a byte or two from call to call.
        assert abs(floor_bytes - gateway_bytes) <= 0.05 * gateway_bytes


def test_in_process_figures_and_printed_report(run: tuple[dict[str, Any], str, Path]) -> None:
    report, printed, _ = run
    inprocess = report["inprocess"]
    assert {(r["system"], r["backend"]) for r in inprocess} == {("gateway", "memory")}
    assert all(r["commands"] > 0 and r["commands_per_s"] > 0 for r in inprocess)
    assert "calls/s vs floor" in printed
    # Memory only: every target is about a durable store or a section not run.
    after = printed.split("Targets (benchmarks, not tests)\n")[1].splitlines()
    verdicts = [line for line in after if line.startswith("  ")]
    assert verdicts and all(v.strip().startswith("NOT MEASURED") for v in verdicts)


def test_plot_is_written_as_png(run: tuple[dict[str, Any], str, Path]) -> None:
    _, _, plot = run
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_targets_are_judged_from_the_figures() -> None:
    report = Report(
        load=[
            made_up_load("floor", 16, 1000, 10.0, cpu_ms=0.2),
            made_up_load(DURABLE_FLOOR, 16, 800, 12.0, cpu_ms=0.3),
            # 0.85 x the bare floor but 1.06 x the durable one: pass; CPU 1.5 x: fail.
            made_up_load("sqlite", 16, 850, 12.0, cpu_ms=0.45),
            made_up_load("floor", 1, 500, 1.0),
            made_up_load(DURABLE_FLOOR, 1, 450, 1.3),
            made_up_load(DURABLE_FLOOR_ON_LOOP, 1, 470, 1.2),
            # 1.6 x the bare floor's p50, 1.33 x the lowest durable one's: fail.
            made_up_load("sqlite", 1, 300, 1.6),
            made_up_load("sqlite", 16, 800, 12.0, "hot", cpu_ms=0.45),  # 0.94 x create: pass
            made_up_load("postgresql", 16, 500, 10.0),
            made_up_load("postgresql", 16, 350, 10.0, "hot"),  # 0.70 x create: fail
        ],
        inprocess=[
            InProcessResult("eventsourcing", "sqlite", 1, 1000, 1.0),
            InProcessResult("gateway", "sqlite", 1, 2000, 1.0),
            InProcessResult("gateway", "sqlite", 64, 6000, 1.0),  # the best: 6 x, pass
        ],
        catch_up=[CatchUpResult("floor", 1000, 1.0, 10.0), CatchUpResult("sqlite", 600, 1.0, 20.0)],
        fan_out=[FanOutResult("sqlite", 200, 50.0, 500.0, 100, 100, 100, 80.0, 199.0)],
        stream_length=[StreamLengthResult("sqlite", 1.0, 1.05, 100_000)],
        replicas=[
            ReplicaResult(
                "hot",
                8,
                20.0,
                made_up_load("replica alone", 16, 400, 20.0, "hot"),
                made_up_load("replica alone", 8, 380, 20.0, "hot"),
                [
                    made_up_load("replica 1", 8, 300, 20.0, "hot"),
                    made_up_load("replica 2", 8, 150, 20.0, "hot", {"ABORTED": 3}),
                ],
            )
        ],
        cold_start=[
            ColdStartResult("sqlite", 100_000, 0, 900.0, 1.0),  # no snapshots: not judged
            ColdStartResult("sqlite", 100_000, DEFAULT_INTERVAL, 2.5, 1.0),  # 2.5 x: fail
        ],
        verify=[VerifyResult("sqlite", 1_000_000, 40.0), VerifyResult("postgresql", 200_000, 10.0)],
    )
    outcomes = {v.target.split(":")[0]: v.outcome for v in evaluate(report)}
    assert list(outcomes.values()) == [
        "PASS",  # CreateOrder at 16 >= 0.8 x the group-commit durable floor
        "FAIL",  # p50 at 1 <= 1.3 x the best durable floor's
        "FAIL",  # server CPU per call <= 1.4 x the durable floor's
        "PASS",  # in-process on SQLite >= 5 x eventsourcing
        "NOT MEASURED",  # in-process on PostgreSQL
        "FAIL",  # catch-up 0.6 x floor
        "PASS",  # hot stream within 10%
        "FAIL",  # cold start 2.5 x warm
        "PASS",  # verify: the slowest 20,000 events/s
        "PASS",  # RSS 199 MB < 200 MB
        "NOT MEASURED",  # --workers 2 against 1 on SQLite, at 32 concurrent
        "NOT MEASURED",  # the same on PostgreSQL
        "NOT MEASURED",  # --workers 2 p50 at 1 concurrent on SQLite
        "NOT MEASURED",  # the same on PostgreSQL
        "NOT MEASURED",  # live delivery across workers
        "PASS",  # hot on SQLite
        "FAIL",  # hot on PostgreSQL
        "FAIL",  # two replicas: 3 ABORTED
        "NOT MEASURED",  # consumer group, 1 member, against Subscribe
        "NOT MEASURED",  # consumer group, 4 members against 1
        "NOT MEASURED",  # RSS with a group of 100 members
    ]
    printed = io.StringIO()
    print_report(report, printed)
    text = printed.getvalue()
    assert "0.60x" in text  # catch-up against its floor
    assert "6.00x" in text  # in-process against eventsourcing
    assert "100/100" in text  # fan-out: every subscriber got every event
    assert "ABORTED=3" in text  # every error code of the replicas, per replica and in total
    assert "0.33" in text  # replica 2's share of the 450 calls/s
    assert "8 callers on each, 20 s, load generator python" in text


def test_with_rounds_the_durable_floor_targets_give_the_range_of_each_round_s_ratio() -> None:
    def rounds(*loads: LoadResult) -> list[LoadResult]:
        return [replace(load, round_number=n) for n, load in enumerate(loads, start=1)]

    gateway_16 = rounds(
        made_up_load("sqlite", 16, 700, 12.0, cpu_ms=0.50),
        made_up_load("sqlite", 16, 900, 12.0, cpu_ms=0.40),
        made_up_load("sqlite", 16, 800, 12.0, cpu_ms=0.45),
    )
    floor_16 = rounds(
        made_up_load(DURABLE_FLOOR, 16, 1000, 10.0, cpu_ms=0.40),
        made_up_load(DURABLE_FLOOR, 16, 1000, 10.0, cpu_ms=0.30),
        made_up_load(DURABLE_FLOOR, 16, 1000, 10.0, cpu_ms=0.35),
    )
    gateway_1 = rounds(made_up_load("sqlite", 1, 300, 1.5), made_up_load("sqlite", 1, 300, 1.3))
    # The best durable floor of each round: on the loop in round 1, group commit in round 2.
    group_1 = rounds(
        made_up_load(DURABLE_FLOOR, 1, 450, 1.2), made_up_load(DURABLE_FLOOR, 1, 450, 1.0)
    )
    on_loop_1 = rounds(
        made_up_load(DURABLE_FLOOR_ON_LOOP, 1, 470, 1.0),
        made_up_load(DURABLE_FLOOR_ON_LOOP, 1, 470, 1.3),
    )
    measured = [gateway_16, floor_16, gateway_1, group_1, on_loop_1]
    report = Report(
        load=[median_round(r) for r in measured],
        load_rounds=[load for r in measured for load in r],
    )
    verdicts = evaluate(report)[:3]
    # Judged by the median of the rounds' own ratios: calls/s 0.7, 0.9 and 0.8 x; p50 1.5
    # and 1.3 x (the medians' ratio, 1.4 vs 1.1 ms, would pass); CPU 1.25, 1.33, 1.29 x.
    assert [v.outcome for v in verdicts] == ["PASS", "FAIL", "PASS"]
    assert "3 rounds: 0.70-0.90 x, median 0.80 x" in verdicts[0].detail
    assert "2 rounds: 1.30-1.50 x, median 1.40 x" in verdicts[1].detail
    assert "3 rounds: 1.25-1.33 x, median 1.29 x" in verdicts[2].detail


def test_subscriptions_section_without_fan_out(tmp_path: Path) -> None:
    """``--subscribers 0`` measures catch-up only: an empty fan-out is no error."""
    report = bench_report(
        tmp_path,
        *("--store", "sqlite", "--sections", "subscriptions"),
        *("--catch-up-events", "300", "--subscribers", "0"),
    )
    assert report["fan_out"] == []
    assert {entry["server"] for entry in report["catch_up"]} == {"floor", "sqlite"}


def test_stream_length_section_with_cold_starts_and_verify(tmp_path: Path) -> None:
    report = bench_report(
        tmp_path,
        *("--store", "sqlite", "--sections", "stream-length"),
        *("--stream-events", "300", "--stream-orders", "3"),
        *("--snapshot-intervals", "20", "--cold-starts", "2", "--verify-events", "500"),
    )
    assert [r["snapshot_interval"] for r in report["cold_start"]] == [0, 20]
    assert all(r["cold_ms"] > 0 and r["warm_p50_ms"] > 0 for r in report["cold_start"])
    assert [(r["store"], r["events"]) for r in report["verify"]] == [("sqlite", 500)]
    text = (tmp_path / "stdout.txt").read_text()
    assert "Cold start" in text and "order-gateway verify" in text


def test_workers_targets_are_judged_from_interleaved_rounds() -> None:
    def rounds(workers: int, concurrency: int, *figures: tuple[float, float]) -> list[LoadResult]:
        return [
            made_up_load(label("sqlite", workers), concurrency, calls, p50, cpu_ms=0.5)
            for calls, p50 in figures
        ]

    report = Report(
        workers=[
            *rounds(1, 32, (1000, 30.0), (1100, 28.0)),
            # Means 1,300 against 1,050 calls/s: 1.24 x, short of 1.25 x.
            *rounds(2, 32, (1250, 25.0), (1350, 24.0)),
            *rounds(1, 1, (400, 2.0), (400, 2.2)),
            *rounds(2, 1, (390, 2.2), (390, 2.3)),  # p50 2.25 against 2.10 ms: 1.07 x
        ],
        delivery=[
            # Judged from the creator's answer (commit to subscriber), not from the send,
            # which counts the command's own latency too.
            DeliveryResult(
                "sqlite",
                300,
                {"1": 4, "2": 4},
                after_answer=Latencies(2.0, 4.0, 9.0),
                from_handling=Latencies(3.0, 6.0, 12.0),
                from_send=Latencies(5.0, 9.0, 30.0),
                same_worker_after_answer=Latencies(0.5, 1, 3),
                cross_worker=1200,
            )
        ],
    )
    verdicts = {v.target: v for v in evaluate(report)}
    throughput = next(v for t, v in verdicts.items() if "on sqlite at 32" in t)
    latency = next(v for t, v in verdicts.items() if "on sqlite at 1 concurrent: --workers" in t)
    delivery = next(v for t, v in verdicts.items() if t.startswith("live delivery"))
    assert (throughput.outcome, latency.outcome, delivery.outcome) == ("FAIL", "PASS", "PASS")
    assert throughput.detail.startswith("1,300 vs 1,050 calls/s = 1.24 x (mean of 2 rounds")
    assert latency.detail == "p50 2.25 vs 2.10 ms = 1.07 x (mean of 2 rounds)"
    assert delivery.detail.startswith("sqlite: p99 9.00 ms after the creator's answer")
    postgres = [v for t, v in verdicts.items() if "postgresql" in t]
    assert postgres and all(v.outcome == "NOT MEASURED" for v in postgres)
    printed = io.StringIO()
    print_report(report, printed)
    assert "subscribers by worker {'1': 4, '2': 4}" in printed.getvalue()


def test_a_run_with_a_shorter_stream_does_not_judge_the_100_000_event_targets() -> None:
    report = Report(
        stream_length=[StreamLengthResult("sqlite", 1.0, 1.0, 1_000)],
        cold_start=[ColdStartResult("sqlite", 1_000, DEFAULT_INTERVAL, 1.5, 1.0)],
    )
    verdicts = {v.target.split(" ")[1]: v for v in evaluate(report)}
    for verdict in (verdicts["latency"], verdicts["order"]):
        assert verdict.outcome == "NOT MEASURED"
        assert "this run's stream had 1,000 events" in verdict.detail
