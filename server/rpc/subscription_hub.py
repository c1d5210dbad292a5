"""The per-process subscription hub: one reader of new events, fanned out to every subscriber.

However many subscriptions are open, a single reader task follows the store's head with
``read_all`` in pages, woken by the store's commit listener (and by a polling fallback, so
a lost wake-up only delays). Each page is offered to every live subscription without
ever awaiting one: the hub never waits for a consumer, so a slow one cannot slow the
others or the command path.

A subscription reads history from the store in pages, then attaches to the hub. Gapless,
duplicate-free handoff rests on one invariant: a subscription only attaches when it has
read at least as far as the hub (``cursor >= hub head``), and attaching happens without an
await in between, so every later page the hub reads continues exactly where the
subscription stands; events it already has are skipped by position. A subscription whose
bounded buffer would overflow is detached and simply goes back to reading pages from the
store from its own cursor, at its own pace, until it has caught up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

from orders.v1 import event_stream_service_pb2

from domain.errors import StoreFullError, StoreUnavailableError
from domain.ports import EventStore, RecordedEvent
from domain.values import MAX_INT64
from server.cancellation import raise_if_cancelling
from server.rpc.mapping import event_response, row_event_response
from server.stores.event_rows import (
    EVENT_TYPE,
    POSITION,
    STREAM_ID,
    EventRow,
    EventRowReader,
    StreamRowReader,
    UndecodableRowError,
)

log = logging.getLogger("order_gateway.subscriptions")

SubscribeResponse = event_stream_service_pb2.SubscribeResponse


@dataclass(frozen=True, slots=True)
class HubTuning:
    """How the hub trades memory, store reads and latency. Defaults suit production."""

    page_size: int = 500
    """Events per ``read_all`` call, for the hub and for catching-up subscriptions."""
    buffer_size: int = 2000
    """Matching events a live subscription may hold unsent before it falls back to the store."""
    poll_interval: float = 1.0
    """Seconds between reads of the head when no commit wake-up arrives."""
    checkpoint_interval: float = 5.0
    """Longest silence on a subscription before it gets a Checkpoint (docs/api.md promises 5 s)."""
    stop_timeout: float = 1.0
    """On stop, how long open streams get to end before their calls are cancelled."""


class TooManySubscribersError(Exception):
    """The process already serves ``max_subscribers`` subscriptions."""


class HubClosedError(Exception):
    """The hub is stopping or stopped: the server is shutting down."""


@dataclass(frozen=True, slots=True)
class EventFilter:
    """What a subscription wants; empty means everything. Hashable, so subscriptions with
    the same filter share one filtered list per page."""

    event_types: frozenset[str] = frozenset()
    stream_id: str = ""

    @property
    def accepts_all(self) -> bool:
        return not self.event_types and not self.stream_id

    def matches(self, record: RecordedEvent) -> bool:
        return self.accepts(record.event_type, record.stream_id)

    def accepts(self, event_type: str, stream_id: str) -> bool:
        return (not self.event_types or event_type in self.event_types) and (
            not self.stream_id or stream_id == self.stream_id
        )


class SharedEvent:
    """A recorded event as the hub hands it out: mapped to proto at most once, on first
    use, and then shared (read-only) by every subscription that delivers it."""

    __slots__ = ("_response", "record")

    def __init__(self, record: RecordedEvent) -> None:
        self.record = record
        self._response: event_stream_service_pb2.SubscribeResponse | None = None

    @property
    def position(self) -> int:
        return self.record.position

    @property
    def response(self) -> event_stream_service_pb2.SubscribeResponse:
        if self._response is None:
            self._response = event_response(SubscribeResponse, self.record)
        return self._response


def _checkpoint(position: int) -> event_stream_service_pb2.SubscribeResponse:
    return SubscribeResponse(checkpoint=event_stream_service_pb2.Checkpoint(position=position))


_row_response = partial(row_event_response, SubscribeResponse)
_record_response = partial(event_response, SubscribeResponse)


@dataclass(frozen=True, slots=True)
class _StorePage:
    """One page a catching-up subscription read from the store."""

    full: bool
    """The read stopped at the page size: more may follow at once."""
    examined_through: int
    """Every event up to this position was examined, matching or not (0: none)."""
    responses: Iterator[event_stream_service_pb2.SubscribeResponse]
    """Those that match, mapped one by one as they are sent."""


_EMPTY = _StorePage(False, 0, iter(()))


async def _read_page(
    store: EventStore, after_position: int, page_size: int, event_filter: EventFilter
) -> _StorePage:
    # The hot path of a catch-up: per event, only the filter and the mapping to proto,
    # done lazily as each response is sent. Rows, where the store offers them, spare a
    # RecordedEvent and a datetime per event (see server.stores.event_rows).
    if event_filter.stream_id and isinstance(store, StreamRowReader):
        # One stream's events by index: a subscriber to a single order does not read the
        # rest of a million-event log first.
        rows, head = await store.read_stream_rows_after(
            event_filter.stream_id, after_position, page_size
        )
        full = len(rows) == page_size
        matching_rows: Iterator[EventRow] = (
            iter(rows)
            if not event_filter.event_types
            else (row for row in rows if row[EVENT_TYPE] in event_filter.event_types)
        )
        examined = rows[-1][POSITION] if full else head
        return _StorePage(full, examined, map(_row_response, matching_rows))
    if isinstance(store, EventRowReader):
        try:
            rows = await store.read_all_rows(after_position, page_size)
            full = len(rows) == page_size
        except UndecodableRowError as damaged:
            if not damaged.before:
                raise
            # The rows before the damaged one are delivered first, as a page that may be
            # followed at once: the next read starts at the damaged row and fails there,
            # where the log names it. Failing the whole page withheld up to a page of
            # good events, which a subscriber resuming after the named position skipped.
            rows, full = damaged.before, True
        if not rows:
            return _EMPTY
        matching_rows = (
            iter(rows)
            if event_filter.accepts_all
            else (row for row in rows if event_filter.accepts(row[EVENT_TYPE], row[STREAM_ID]))
        )
        return _StorePage(full, rows[-1][POSITION], map(_row_response, matching_rows))
    records = await store.read_all(after_position, page_size)
    if not records:
        return _EMPTY
    matching = records if event_filter.accepts_all else filter(event_filter.matches, records)
    return _StorePage(
        len(records) == page_size, records[-1].position, map(_record_response, matching)
    )


class Subscription:
    """One subscriber: where it stands, and its bounded buffer of live events.

    ``cursor``: events at or below it are never delivered (the request's starting point,
    then the last event examined). ``examined``: the checkpoint position, the highest
    committed position examined; it differs from ``cursor`` only while a client asked
    to start beyond the committed head.
    """

    def __init__(
        self, hub: SubscriptionHub, event_filter: EventFilter, task: asyncio.Task[object] | None
    ) -> None:
        self._hub = hub
        self.filter = event_filter
        self.task = task
        self._cursor = 0
        self._examined = 0
        self._chunks: deque[Sequence[SharedEvent]] = deque()
        self._buffered = 0
        self._seen_through = 0
        self.live = False
        self._closed = False
        self._wake = asyncio.Event()

    def start_at(self, cursor: int, examined: int) -> None:
        self._cursor = cursor
        self._examined = examined

    # Hub side: synchronous, never awaits, so the hub never waits for a consumer.

    def attach(self, hub_head: int) -> None:
        self.live = True
        self._seen_through = hub_head

    def offer(self, matching: Sequence[SharedEvent], through: int) -> bool:
        """Buffer this page's matching events; False (and detached) if they do not fit.

        A page that does not fit is refused whole and ``through`` is not recorded, so the
        subscription re-reads exactly that page from the store.
        """
        if matching:
            if self._buffered and self._buffered + len(matching) > self._hub.tuning.buffer_size:
                self.live = False
                self._wake.set()
                return False
            self._chunks.append(matching)
            self._buffered += len(matching)
            self._wake.set()
        # Non-matching pages only move the checkpoint position: no wake-up needed.
        self._seen_through = through
        return True

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    # Subscriber side.

    def _advance(self, position: int) -> None:
        self._examined = max(self._examined, position)
        self._cursor = max(self._cursor, position)

    async def responses(self) -> AsyncIterator[event_stream_service_pb2.SubscribeResponse]:
        """Catch-up, then live, with a checkpoint on catching up and after every silence
        of ``checkpoint_interval``. Raises HubClosedError when the hub stops."""
        tuning = self._hub.tuning
        store = self._hub.store
        clock = asyncio.get_running_loop().time
        quiet_until = clock() + tuning.checkpoint_interval
        while True:
            if self._closed:
                raise HubClosedError
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                for event in chunk:
                    # Pages the hub read before this subscription's own store reads
                    # ended may repeat what it already delivered.
                    if event.position > self._cursor:
                        self._advance(event.position)
                        yield event.response
                        quiet_until = clock() + tuning.checkpoint_interval
                if not self._chunks:
                    self._advance(self._seen_through)
                self._hub.report_progress(self._cursor)
            elif self.live:
                self._wake.clear()
                try:
                    async with asyncio.timeout(quiet_until - clock()):
                        await self._wake.wait()
                except TimeoutError:
                    if self._chunks:
                        # The hub offered events in the same turn of the event loop as the
                        # timeout fired: advancing past them now would skip them.
                        continue
                    self._advance(self._seen_through)
                    self._hub.report_progress(self._cursor)
                    yield _checkpoint(self._examined)
                    quiet_until = clock() + tuning.checkpoint_interval
            else:
                page = await _read_page(store, self._cursor, tuning.page_size, self.filter)
                delivered = False
                for response in page.responses:
                    yield response
                    delivered = True
                # Nothing reads the cursor while the page is being sent (the subscription
                # is not live), so it moves once, past everything the page examined.
                if page.examined_through:
                    self._advance(page.examined_through)
                if delivered:
                    quiet_until = clock() + tuning.checkpoint_interval
                # Behind, the head is read for the lag: the hub's own is how far its
                # live reader has read, which stands still while nobody is live. One
                # cheap read per full page (``page_size`` events).
                self._hub.report_progress(
                    self._cursor, await store.head_position() if page.full else None
                )
                caught_up = not page.full and self._hub.try_attach(
                    self, self._cursor, self._examined
                )
                if caught_up or clock() >= quiet_until:
                    yield _checkpoint(self._examined)
                    quiet_until = clock() + tuning.checkpoint_interval
                # A store that answers without suspending (memory) must not let a long
                # catch-up with nothing to send monopolise the event loop.
                await asyncio.sleep(0)


class SubscriptionHub:
    """Shares the reading of new events among all of a process's subscriptions."""

    def __init__(
        self,
        store: EventStore,
        max_subscribers: int,
        tuning: HubTuning | None = None,
        on_lag: Callable[[int, int], None] | None = None,
    ) -> None:
        """``on_lag(head, delivered)`` hears each subscription's progress once per batch
        sent (events or a checkpoint), for the subscription-lag metric."""
        self.store = store
        self.tuning = tuning or HubTuning()
        self._on_lag = on_lag
        self._max_subscribers = max_subscribers
        self._subscriptions: set[Subscription] = set()
        self._limited = 0
        """Subscriptions that count against ``max_subscribers``."""
        self._live: set[Subscription] = set()
        self._head = 0
        self._wake = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self.fallbacks = 0
        """How many times a live subscription fell behind and went back to the store."""
        self.on_subscribed: Callable[[bool], None] | None = None
        """Hears True when the first subscription opens and False when the last ends
        (``--workers``: the other workers then hurry, or stop hurrying, their notices)."""

    @property
    def head(self) -> int:
        """The highest position the hub has read and offered to live subscriptions
        (it stands still while there are none)."""
        return self._head

    @property
    def subscriber_count(self) -> int:
        """Every open subscription, the consumer groups' readers included."""
        return len(self._subscriptions)

    @property
    def limited_count(self) -> int:
        """Open subscriptions that count against ``max_subscribers``: clients' Subscribe
        streams."""
        return self._limited

    async def start(self) -> None:
        # Nobody is live yet, so there is nothing to offer below the current head.
        self._head = await self.store.head_position()
        self.store.add_commit_listener(self._on_commit)
        self._reader = asyncio.create_task(self._follow(), name="subscription-hub")

    async def stop(self) -> None:
        """End every subscription (HubClosedError in its stream), then stop reading.

        A stream stuck sending to a client that does not read is cancelled after
        ``stop_timeout``: the server must not wait on it (server.stop would hang).
        """
        self._closed = True
        for subscription in self._subscriptions:
            subscription.close()
        tasks = {s.task for s in self._subscriptions if s.task is not None}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.tuning.stop_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=self.tuning.stop_timeout)
        if self._reader is not None:
            self._reader.cancel()
            # Bounded: a read cancelled in the store's driver can end in a store error
            # instead, which the reader survives (it then ends on ``_closed``).
            await asyncio.wait({self._reader}, timeout=self.tuning.stop_timeout)

    @contextlib.asynccontextmanager
    async def subscribe(
        self,
        event_filter: EventFilter,
        after_position: int,
        from_end: bool,
        *,
        limited: bool = True,
    ) -> AsyncIterator[Subscription]:
        """Open a subscription for the calling task; it is released on exit.

        ``limited``: it counts against ``max_subscribers``, as a client's Subscribe does;
        the consumer groups' own readers (one per group) do not, so that clients can
        neither be refused because of them nor stall them by taking every slot.

        Raises HubClosedError when stopping, TooManySubscribersError beyond the limit.
        """
        if self._closed:
            raise HubClosedError
        if limited and self._limited >= self._max_subscribers:
            raise TooManySubscribersError
        subscription = Subscription(self, event_filter, asyncio.current_task())
        # Counted before the first await, so concurrent calls cannot overshoot the limit.
        self._subscriptions.add(subscription)
        self._limited += limited
        if len(self._subscriptions) == 1 and self.on_subscribed is not None:
            self.on_subscribed(True)
        # The request's uint64 may exceed the stores' 64-bit signed positions, which no
        # event does: starting from the largest one delivers the same (nothing), and
        # keeps the value within what the stores' queries accept.
        after_position = min(after_position, MAX_INT64)
        try:
            head = await self.store.head_position()
            if from_end:
                subscription.start_at(head, head)
            else:
                # A checkpoint never reports beyond the committed head, even if the
                # client asks to start past it.
                subscription.start_at(after_position, min(after_position, head))
            yield subscription
        finally:
            self._subscriptions.discard(subscription)
            self._limited -= limited
            self._live.discard(subscription)
            if not self._subscriptions and self.on_subscribed is not None:
                self.on_subscribed(False)

    def _on_commit(self) -> None:
        # With nobody live there is nothing to read for: waking the reader anyway would
        # cost every command a task switch. ``try_attach`` wakes it when that changes.
        if self._live:
            self._wake.set()

    def report_progress(self, delivered: int, head: int | None = None) -> None:
        """A subscription delivered through ``delivered``; ``head``: the committed head,
        when the subscription read it (else the hub's, current while anyone is live)."""
        if self._on_lag is not None:
            self._on_lag(max(self._head, head or 0, delivered), delivered)

    def try_attach(self, subscription: Subscription, cursor: int, examined: int) -> bool:
        """Make the subscription live if it has read at least as far as the hub.

        ``examined``: how far it has read the log; below ``cursor`` only when the client
        asked to start beyond the committed head.

        Synchronous on purpose: between this check and the next page the hub offers,
        nothing can run, so live delivery continues exactly after ``self._head``.
        """
        if not self._live:
            # Nobody was listening, so the hub did not read: it can start where this
            # subscription has read to. Not from its cursor: one beyond the committed
            # head would put the hub there, every later subscriber would find itself
            # behind the hub and poll the store without pause, and checkpoints would
            # report positions not yet committed.
            self._head = max(self._head, examined)
        if self._closed or cursor < self._head:
            return False
        subscription.attach(self._head)
        self._live.add(subscription)
        # Commits between the subscription's last read and now did not wake the reader
        # (nobody was live): read once, so they are delivered without waiting for a poll.
        self._wake.set()
        return True

    async def _follow(self) -> None:
        failing = logged = False
        while not self._closed:
            raise_if_cancelling()
            if failing:
                # While the store fails, retry at the polling pace, not on every commit.
                await asyncio.sleep(self.tuning.poll_interval)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.tuning.poll_interval):
                        await self._wake.wait()
            self._wake.clear()
            try:
                await self._read_new_events()
            except Exception as error:
                # Live subscriptions only wait: nothing is lost, the next read continues
                # from the same head. Logged once per outage, not once per retry, and not
                # at all for a store fault: the store's watcher logs that for everyone.
                if not failing and not isinstance(error, StoreFullError | StoreUnavailableError):
                    log.exception("reading new events for subscriptions failed; retrying")
                    logged = True
                failing = True
            else:
                if logged:
                    log.info("reading new events for subscriptions works again")
                failing = logged = False

    async def _read_new_events(self) -> None:
        page_size = self.tuning.page_size
        # With no live subscription there is nobody to read for: the command path's
        # commits then cost no reads (``try_attach`` moves the head up on first attach).
        while self._live:
            page = await self.store.read_all(self._head, page_size)
            if not page:
                return
            if self._live:
                self._fan_out([SharedEvent(record) for record in page])
            # A subscription that attached during the read may have moved the head past
            # this page: never move it back (repeats are skipped by position anyway).
            self._head = max(self._head, page[-1].position)
            if len(page) < page_size:
                return

    def _fan_out(self, page: list[SharedEvent]) -> None:
        through = page[-1].position
        by_filter: dict[EventFilter, list[SharedEvent]] = {}
        by_stream: dict[str, list[SharedEvent]] | None = None
        fallen_behind: list[Subscription] = []
        for subscription in self._live:
            wanted = subscription.filter
            matching = by_filter.get(wanted)
            if matching is None:
                if wanted.accepts_all:
                    matching = page
                elif wanted.stream_id:
                    # Index the page by stream once, for all stream-filtered subscribers.
                    if by_stream is None:
                        by_stream = {}
                        for event in page:
                            by_stream.setdefault(event.record.stream_id, []).append(event)
                    matching = [
                        event
                        for event in by_stream.get(wanted.stream_id, ())
                        if wanted.matches(event.record)
                    ]
                else:
                    matching = [event for event in page if wanted.matches(event.record)]
                by_filter[wanted] = matching
            if not subscription.offer(matching, through):
                fallen_behind.append(subscription)
        for subscription in fallen_behind:
            self._live.discard(subscription)
        self.fallbacks += len(fallen_behind)
