"""Prometheus metrics of the consumer groups, read at scrape time.

Per group with members here: lag (the committed head, minus the lowest checkpoint of the
partitions delivered here; the head the hub has read, or the store's as of the last
reading when that is further), deliveries in flight, redeliveries (a counter that
survives the group's runtime stopping and starting), parked events, and members
connected here; its lag from the store while none of its partitions is delivered here
(its members here stand by). Per group with no member here, what the store says: its lag
as GetConsumerGroup reports it (from the stored checkpoints, past the events the group
does not take) and its parked events, with no members and nothing in flight here. A
group that stopped being delivered here since the last reading keeps its series until
the store has been read again, its lag counted from the checkpoint it was last seen at.
Otherwise the gauges of a group whose consumers are all down would vanish, and an alert
on its parked events or lag would go quiet just when it matters. Across replicas each
process reports its own members and deliveries; sum ``in_flight`` and ``members`` over
instances, take the max of ``lag`` and ``parked``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from domain.errors import StoreError
from server.consumer_groups.service import ConsumerGroups
from server.rpc.subscription_hub import SubscriptionHub

log = logging.getLogger(__name__)

REREAD_AFTER = 2.0
"""Seconds a reading of the unserved groups serves scrapes before the store is read again:
however often the metrics are scraped, each process reads them at most this often."""

SCRAPE_WAIT = 1.0
"""Seconds a scrape waits for a new reading before it reports the last one (or, with
none yet, leaves the unserved groups out): a slow store must not fail the scrape."""


@dataclass(frozen=True, slots=True)
class StoredFigures:
    lag: int
    parked: int


@dataclass(frozen=True, slots=True)
class LastDelivered:
    """A group's figures when a scrape last saw it delivered here."""

    checkpoint: int
    parked: int


class UnservedGroups:
    """The figures of the groups this process delivers no partition of, and the committed
    head, read from the store when the metrics are collected.

    Collection runs on the metrics server's threads (one per scrape), and the store is
    read on the event loop: a scrape asks the loop for a reading and waits for it up to
    ``wait`` seconds. Collected on the loop's own thread (a test's ``get_sample_value``)
    it cannot wait, and reports the last reading while the next one is made.
    """

    def __init__(
        self,
        groups: ConsumerGroups,
        loop: asyncio.AbstractEventLoop,
        reread_after: float = REREAD_AFTER,
        wait: float = SCRAPE_WAIT,
    ) -> None:
        self._groups = groups
        self._loop = loop
        self._reread_after = reread_after
        self._wait = wait
        self._figures: dict[str, StoredFigures] = {}
        self._head = 0
        self._read_at = float("-inf")
        self._served: frozenset[str] = frozenset()
        """The groups delivered here when the last reading began."""
        self._reading: concurrent.futures.Future[None] | None = None
        self._closed = False
        self._scheduling = threading.Lock()
        """Two scrapes at once start one reading, and none starts once closed."""

    def figures(self) -> Mapping[str, StoredFigures]:
        # A group delivered here since, or no longer, is read again: its figures would be
        # the ones from before.
        fresh = (
            time.monotonic() - self._read_at < self._reread_after
            and self._served == self._groups.delivering()
        )
        if fresh:
            return self._figures
        with self._scheduling:
            reading = self._reading
            if (reading is None or reading.done()) and not self._closed:
                reading = self._reading = asyncio.run_coroutine_threadsafe(self._read(), self._loop)
        if reading is not None and not self._on_loop():
            # Past the wait: the last reading, and the next scrape has this one.
            with contextlib.suppress(
                concurrent.futures.TimeoutError, concurrent.futures.CancelledError
            ):
                reading.result(self._wait)
        return self._figures

    @property
    def served(self) -> frozenset[str]:
        """The groups delivered here when the last reading began: it has no figures of
        theirs."""
        return self._served

    @property
    def head(self) -> int:
        """The committed head as of the last reading (0 before the first): the served
        groups' lag is measured from it when the hub's is behind."""
        return self._head

    def close(self) -> None:
        """No more readings (the store is about to close); one under way is cancelled."""
        with self._scheduling:
            self._closed = True
            if self._reading is not None:
                self._reading.cancel()

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    async def _read(self) -> None:
        served = self._groups.delivering()
        try:
            head, figures = await self._groups.unserved_figures()
        except StoreError as error:
            # The store's fault is reported by its own gauge and log line; the groups keep
            # their last figures meanwhile.
            log.debug("consumer groups: reading the unserved groups failed (%s)", error)
            return
        except Exception:
            # Not the scrape's to fail: the other metrics are still worth having.
            log.warning("consumer groups: reading the unserved groups failed", exc_info=True)
            return
        self._figures = {name: StoredFigures(*pair) for name, pair in figures.items()}
        self._head = head
        self._read_at = time.monotonic()
        self._served = served


class GroupMetricsCollector(Collector):
    def __init__(
        self, groups: ConsumerGroups, hub: SubscriptionHub, unserved: UnservedGroups
    ) -> None:
        self._groups = groups
        self._hub = hub
        self._unserved = unserved
        self._delivered: dict[str, LastDelivered] = {}

    def collect(self) -> Iterator[Metric]:
        labels = ["group"]
        lag = GaugeMetricFamily(
            "order_gateway_consumer_group_lag_events",
            "Committed head minus the group's checkpoint (of the partitions delivered here;"
            " of all, from the store, when none is).",
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
        for name, count in sorted(self._groups.redeliveries().items()):
            redeliveries.add_metric([name], count)
        # One copy for both loops: a group whose last member leaves between them would
        # come out twice (OpenMetrics parsers, the --workers supervisor's, refuse that).
        served = dict(self._groups.runtimes)
        stored = self._unserved.figures()
        # The hub's head stands still while no subscription is live here, which is the
        # case while every group's reader catches up (one that falls more than its window
        # behind included): measured from it alone, the lag of a group falling behind
        # would stop growing, even read 0, just when an alert on it matters.
        head = max(self._hub.head, self._unserved.head)
        unread = self._unread(stored)
        delivered: dict[str, LastDelivered] = {}
        for name, runtime in sorted(served.items()):
            stats = runtime.stats()
            if stats.checkpoint is not None:
                delivered[name] = LastDelivered(stats.checkpoint, stats.parked)
                lag.add_metric([name], max(0, head - stats.checkpoint))
            elif name in stored:
                # Its members here stand by, or wait for their partitions (across replicas
                # and workers, a join is answered before they are shared out): the lag is
                # the store's, as for a group with no member here, not the whole log's.
                lag.add_metric([name], stored[name].lag)
            elif name in unread:
                lag.add_metric([name], max(0, head - unread[name].checkpoint))
            in_flight.add_metric([name], stats.in_flight)
            parked.add_metric([name], stats.parked)
            members.add_metric([name], stats.members)
        for name, figures in sorted(stored.items()):
            if name in served:
                continue  # A member joined since the reading.
            lag.add_metric([name], figures.lag)
            in_flight.add_metric([name], 0)
            parked.add_metric([name], figures.parked)
            members.add_metric([name], 0)
        for name, last in sorted(unread.items()):
            if name in served:
                continue
            # Its last member here left since: nothing in flight or connected here.
            lag.add_metric([name], max(0, head - last.checkpoint))
            in_flight.add_metric([name], 0)
            parked.add_metric([name], last.parked)
            members.add_metric([name], 0)
        self._delivered = {**unread, **delivered}
        yield from (lag, in_flight, parked, members, redeliveries)

    def _unread(self, stored: Mapping[str, StoredFigures]) -> dict[str, LastDelivered]:
        """The groups this process stopped delivering that the last reading of the store
        left out (delivered here when it began), as a scrape last saw them. Until a
        reading has them (one begins when the groups delivered here change, and a scrape
        waits for it only a second), their lag counts from that checkpoint: a series that
        vanished for a scrape would flap an alert on its absence."""
        left_out = self._unserved.served
        return {
            name: last
            for name, last in self._delivered.items()
            if name in left_out and name not in stored
        }
