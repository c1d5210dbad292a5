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
    head: int = 0

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


@dataclass
class Stored:
    """The store's figures, as last read."""

    stored: dict[str, StoredFigures]
    head: int = 0

    def figures(self) -> Mapping[str, StoredFigures]:
        return self.stored


def test_a_group_served_here_that_delivers_no_partition_here_has_the_store_s_lag() -> None:
    # Its one member stands by (another replica delivers the partitions), or waits for
    # its partitions just after joining: no checkpoint of its own, the store's lag.
    standing_by = RuntimeStats(checkpoint=None, in_flight=0, parked=1, members=1)
    collector = GroupMetricsCollector(
        cast(Any, Groups({"g": Runtime(standing_by)})),
        cast(Any, Hub(head=10_000)),
        cast(Any, Stored({"g": StoredFigures(lag=3, parked=1)})),
    )
    samples = {
        sample.name: sample.value for family in collector.collect() for sample in family.samples
    }
    assert samples["order_gateway_consumer_group_lag_events"] == 3
    assert samples["order_gateway_consumer_group_members"] == 1


def lag_of(collector: GroupMetricsCollector) -> float:
    samples = {
        sample.name: sample.value for family in collector.collect() for sample in family.samples
    }
    return samples["order_gateway_consumer_group_lag_events"]


def test_a_served_group_s_lag_is_measured_from_the_furthest_head_known() -> None:
    # The hub's head stands still while nothing here follows the log live (every group's
    # reader catching up): the store's head as last read counts the events since.
    delivering = Groups(
        {"g": Runtime(RuntimeStats(checkpoint=2, in_flight=1, parked=0, members=1))}
    )
    behind = GroupMetricsCollector(
        cast(Any, delivering), cast(Any, Hub(head=5)), cast(Any, Stored({}, head=60))
    )
    assert lag_of(behind) == 58
    # And the hub's, when it has read further than the last reading.
    ahead = GroupMetricsCollector(
        cast(Any, delivering), cast(Any, Hub(head=80)), cast(Any, Stored({}, head=60))
    )
    assert lag_of(ahead) == 78
