"""The consumer-group metrics collector, with fakes: one series per group and name in a
scrape, whatever happens to the group's members while the scrape runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from server.consumer_groups.engine import RuntimeStats
from server.consumer_groups.metrics import GroupMetricsCollector, StoredFigures


@dataclass
class Runtime:
    stats_now: RuntimeStats

    def stats(self) -> RuntimeStats:
        return self.stats_now


@dataclass
class Groups:
    runtimes: dict[str, Runtime] = field(default_factory=dict)

    def redeliveries(self) -> dict[str, int]:
        return {}


@dataclass
class Hub:
    head: int


@dataclass
class LastMemberLeavesDuringTheReading:
    """The store's figures, read while the group's last member left here: the reading
    has the group, and the collector's first loop had it served."""

    groups: Groups

    def figures(self) -> Mapping[str, StoredFigures]:
        self.groups.runtimes.pop("g")
        return {"g": StoredFigures(lag=4, parked=1)}


def test_a_group_whose_last_member_leaves_during_a_scrape_comes_out_once() -> None:
    groups = Groups({"g": Runtime(RuntimeStats(checkpoint=6, in_flight=2, parked=1, members=1))})
    collector = GroupMetricsCollector(
        cast(Any, groups),
        cast(Any, Hub(head=10)),
        cast(Any, LastMemberLeavesDuringTheReading(groups)),
    )
    samples = [
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for family in collector.collect()
        for sample in family.samples
    ]
    series = [(name, labels) for name, labels, _ in samples]
    assert len(series) == len(set(series)), samples
    # As the scrape began: served here, with its own figures.
    assert ("order_gateway_consumer_group_members", (("group", "g"),), 1) in samples
    assert ("order_gateway_consumer_group_lag_events", (("group", "g"),), 4) in samples
