"""Prometheus metrics of the consumer groups served by this process, read at scrape time.

Per group with members here: lag (committed head the hub has read, minus the lowest
checkpoint of the partitions delivered here), deliveries in flight, redeliveries (a
counter that survives the group's runtime stopping and starting), parked events, and
members connected here. Across replicas each process reports its own members and
partitions; sum ``in_flight`` and ``members`` over instances, take the max of ``lag``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.consumer_groups.service import ConsumerGroups
from server.rpc.subscription_hub import SubscriptionHub


class GroupMetricsCollector(Collector):
    def __init__(self, groups: ConsumerGroups, hub: SubscriptionHub) -> None:
        self._groups = groups
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        labels = ["group"]
        lag = GaugeMetricFamily(
            "order_gateway_consumer_group_lag_events",
            "Committed head minus the group's checkpoint (partitions delivered here).",
            labels=labels,
        )
        in_flight = GaugeMetricFamily(
            "order_gateway_consumer_group_in_flight",
            "Deliveries not yet settled, of members connected here.",
            labels=labels,
        )
        parked = GaugeMetricFamily(
            "order_gateway_consumer_group_parked",
            "Parked events of the group (as last read from the store).",
            labels=labels,
        )
        members = GaugeMetricFamily(
            "order_gateway_consumer_group_members",
            "Members of the group connected to this process.",
            labels=labels,
        )
        redeliveries = CounterMetricFamily(
            "order_gateway_consumer_group_redeliveries",
            "Deliveries after an event's first (timeouts, departures, retries, moves).",
            labels=labels,
        )
        head = self._hub.head
        for name, count in sorted(self._groups.redeliveries().items()):
            redeliveries.add_metric([name], count)
        for name, runtime in sorted(self._groups.runtimes.items()):
            stats = runtime.stats()
            lag.add_metric([name], max(0, head - stats.checkpoint))
            in_flight.add_metric([name], stats.in_flight)
            parked.add_metric([name], stats.parked)
            members.add_metric([name], stats.members)
        yield from (lag, in_flight, parked, members, redeliveries)
