"""``python -m bench.consumer_groups`` and the ``consumer-groups`` section of
``python -m bench`` run end to end on a small backlog; the targets are judged from the
figures. Their shape, never their speed."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

from bench.report import GroupDrainResult, GroupLiveResult, Report, print_report
from bench.targets import evaluate
from tests.bench_support import bench_report


def test_the_consumer_group_benchmark_reports_every_measurement() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "bench.consumer_groups", "--events", "400", "--members", "1,2",
         "--rounds", "1", "--live-members", "5", "--duration", "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    drained = ["Subscribe catch-up ", "group, 1 member ", "group, 2 members "]
    for line, label in zip(lines, drained, strict=False):
        assert re.search(
            rf"^round 1  {label}\s+400 events .* events/s .* us/event  peak RSS +\d+ MB$", line
        ), line
    live = [line for line in lines if line.startswith("live ")]
    counts = [re.findall(r"group, +(\d+) member", line) for line in live]
    assert counts == [["1"], ["2"], ["5"]]
    assert all("events/s committed" in line and "MB peak" in line for line in live)
    assert "Consumer groups: draining the backlog" in finished.stdout


def test_the_consumer_groups_section_of_python_m_bench(tmp_path: Path) -> None:
    report = bench_report(
        tmp_path,
        *("--store", "sqlite", "--sections", "consumer-groups"),
        *("--group-events", "300", "--group-rounds", "1", "--group-members", "4"),
        *("--duration", "1", "--warmup", "0.5"),
    )
    assert [(r["members"], r["events"]) for r in report["group_drain"]] == [
        (0, 300),
        (1, 300),
        (2, 300),
        (4, 300),
    ]
    assert [(r["members"], r["partitions"]) for r in report["group_live"]] == [
        (1, 16),
        (2, 16),
        (4, 16),
        (4, 256),
    ]
    assert all(r["committed_events"] > 0 for r in report["group_live"])
    text = (tmp_path / "stdout.txt").read_text()
    assert "consumer group, 1 member, draining a backlog" in text


def test_consumer_group_targets_are_judged_from_the_figures() -> None:
    def drain(round_: int, members: int, events_per_s: float) -> GroupDrainResult:
        return GroupDrainResult("sqlite", round_, members, int(events_per_s), 1.0, 90.0, 100.0)

    def live(members: int, rss_peak_mb: float) -> GroupLiveResult:
        return GroupLiveResult(
            "sqlite", members, 256, 5000, 5000, 5.0, 0, 0.2, 300.0, 80.0, rss_peak_mb
        )

    report = Report(
        group_drain=[
            *(drain(1, 0, 6000), drain(1, 1, 3300), drain(1, 4, 3000)),  # 0.55 and 0.50 x
            *(drain(2, 0, 4000), drain(2, 1, 1800), drain(2, 4, 2000)),  # 0.45 and 0.50 x
        ],
        group_live=[live(4, 90.0), live(100, 201.0)],
    )
    one, four, rss = [v for v in evaluate(report) if "consumer group" in v.target]
    assert one.outcome == "PASS", one  # a mean of 0.50 x Subscribe
    assert one.detail == "sqlite: 0.50 x (mean of 2 rounds: 0.55, 0.45)"
    assert four.outcome == "PASS", four  # 0.50 against 0.50 x
    assert rss.outcome == "FAIL", rss  # 201 MB with 100 members
    slower = Report(group_drain=[drain(1, 0, 6000), drain(1, 1, 2900), drain(1, 4, 2800)])
    one, four, rss = [v for v in evaluate(slower) if "consumer group" in v.target]
    assert (one.outcome, four.outcome, rss.outcome) == ("FAIL", "FAIL", "NOT MEASURED")
    printed = io.StringIO()
    print_report(report, printed)
    assert "0.55x" in printed.getvalue() and "201" in printed.getvalue()
