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
    served: frozenset[str] = frozenset({"g"})

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
    served: frozenset[str] = frozenset()
    """The groups delivered here when that reading began (it has no figures of theirs)."""

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


def series(collector: GroupMetricsCollector) -> dict[tuple[str, str], float]:
    return {
        (sample.name, sample.labels["group"]): sample.value
        for family in collector.collect()
        for sample in family.samples
    }


LAG = "order_gateway_consumer_group_lag_events"


def test_a_group_that_stops_being_delivered_here_keeps_its_lag_until_the_store_is_read() -> None:
    # The last reading began while the group was delivered here, so it has no figures
    # of it; the next one (begun when that changed) has not come within the scrape's
    # wait. Its lag goes on counting from the checkpoint it was last seen at.
    runtime = Runtime(RuntimeStats(checkpoint=6, in_flight=2, parked=1, members=2))
    groups = Groups({"g": runtime})
    hub = Hub(head=10)
    reading = Stored({}, served=frozenset({"g"}))
    collector = GroupMetricsCollector(cast(Any, groups), cast(Any, hub), cast(Any, reading))
    assert series(collector)[(LAG, "g")] == 4
    # Its members here stand by (another replica took its partitions).
    runtime.stats_now = RuntimeStats(checkpoint=None, in_flight=0, parked=1, members=2)
    hub.head = 15
    assert series(collector)[(LAG, "g")] == 9
    # Its last member here left.
    del groups.runtimes["g"]
    hub.head = 17
    gone = series(collector)
    assert gone[(LAG, "g")] == 11
    assert gone[("order_gateway_consumer_group_parked", "g")] == 1
    assert gone[("order_gateway_consumer_group_members", "g")] == 0
    # A reading that has it: the store's figures.
    reading.stored = {"g": StoredFigures(lag=3, parked=2)}
    reading.served = frozenset()
    assert series(collector)[(LAG, "g")] == 3


def test_a_group_left_out_of_a_finished_reading_is_not_reported_from_memory() -> None:
    # Deleted while delivered here: the first reading begun since leaves it out, and
    # its series goes.
    groups = Groups({"g": Runtime(RuntimeStats(checkpoint=6, in_flight=0, parked=0, members=1))})
    reading = Stored({}, served=frozenset({"g"}))
    collector = GroupMetricsCollector(
        cast(Any, groups), cast(Any, Hub(head=10)), cast(Any, reading)
    )
    assert series(collector)[(LAG, "g")] == 4
    del groups.runtimes["g"]
    reading.served = frozenset()
    assert (LAG, "g") not in series(collector)
