"""``order-gateway verify``: reads the whole log and checks what the store promises.

- positions run 1, 2, … N with no gap and no repeat;
- each stream's versions run 1, 2, … n in position order;
- every event id is a UUID, and no two events share one;
- every event decodes into its domain event (after upcasting);
- every command record points at exactly its events: each run of consecutive events
  with one command id has a record with that first position and count, and no record
  points anywhere else;
- each product's stock, replayed, never goes negative and matches every event's
  ``available_after`` (after a mismatch, the replay goes on from the recorded level, so
  that one missing or damaged event is one violation, not one per later event);
- the events agree with each other (``domain.log_rules``): each is in its order's or
  product's stream, an order's stream holds its creation then at most its cancel, an
  order's amounts add up, and each command's events are those of one command: an order's
  reservations are its items, its cancel releases exactly those;
- a SQLite file passes SQLite's integrity check first (pages, indexes, and the tables no
  read of the log touches, such as the consumer groups'); a damaged file's log is not read.

The log is streamed in pages, holding only each stream's last version, each product's
stock and one number per order not cancelled, so memory grows with the number of
streams, not of events (repeated
event ids are found by the store, with one grouping query). Events committed after the
check starts are left for the next run.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from domain.aggregates import Product
from domain.events import DomainEvent, ProductRestocked, StockReleased, StockReserved
from domain.fingerprints import is_well_formed
from domain.log_rules import LogRules
from domain.mapper import decode, undecodable_reason
from domain.ports import EventStore
from server.client.output import UnwritableOutputError, unwritable_output
from server.stores.event_rows import (
    COMMAND_ID,
    POSITION,
    EventRow,
    EventRowReader,
    UndecodableRowError,
)
from server.stores.factory import holds_a_store, is_memory_url, open_store, sqlite_path
from server.stores.urls import redacted_url

PAGE_SIZE = 10_000
"""Events per read (and commands per lookup batch)."""
MAX_LISTED = 20
PRODUCT_STREAMS = f"{Product.stream_prefix}-"
"""Violations printed one by one; the rest are counted."""

CommandRange = tuple[str, int, int]
"""A command record: command_id, first_position, event_count."""
CommandRecordRow = tuple[str, int, int, str]
"""A command record as read: command_id, first_position, event_count, fingerprint."""

EARLIEST_TIME_US = -62_135_596_800_000_000
LATEST_TIME_US = 253_402_300_799_999_999
"""An event's time as microseconds since the Unix epoch, from the first to the last
moment a ``datetime`` holds (years 1 to 9999): a time outside it cannot be served."""

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
"""An event id as the gateway writes it: a UUID in the 36-character hyphenated form."""


@runtime_checkable
class CommandLog(Protocol):
    """What ``verify`` needs of a store besides ``read_all``: its command records."""

    async def head_position(self) -> int:
        """The position of the last committed event (0 when empty)."""
        ...

    async def find_command_ranges(self, command_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """For each of ``command_ids`` that is recorded: (first_position, event_count)."""
        ...

    async def read_command_records(
        self, after_command_id: str, limit: int
    ) -> list[CommandRecordRow]:
        """Up to ``limit`` records with ``command_id > after_command_id``, by command_id."""
        ...

    async def repeated_event_ids(self, head: int, limit: int) -> list[tuple[str, list[int]]]:
        """Up to ``limit`` event ids that more than one event at or below ``head`` has,
        each with those events' positions in order, by their first position."""
        ...


@runtime_checkable
class FileCheck(Protocol):
    """A store kept in a file that can check the file itself (SQLite)."""

    async def file_damage(self) -> list[str]:
        """What is wrong with the file, empty if nothing."""
        ...


@dataclass(frozen=True, slots=True, order=True)
class Violation:
    position: int
    problem: str


@dataclass(slots=True)
class Report:
    events: int = 0
    streams: int = 0
    commands: int = 0
    products: int = 0
    seconds: float = 0.0
    violations: list[Violation] = field(default_factory=list)
    violation_count: int = 0
    damage: list[str] = field(default_factory=list)
    """What the store's check of its file found; the log of a damaged file is not read."""

    @property
    def ok(self) -> bool:
        return self.violation_count == 0 and not self.damage

    @property
    def first(self) -> Violation | None:
        return min(self.violations, default=None)

    def add(self, position: int, problem: str) -> None:
        self.violation_count += 1
        self.violations.append(Violation(position, problem))
        if len(self.violations) > 4 * MAX_LISTED:
            # Only the earliest are listed: keep them, drop the rest.
            self.violations = sorted(self.violations)[:MAX_LISTED]

    def lines(self) -> list[str]:
        if self.damage:
            problems = [f"file: {problem}" for problem in self.damage[:MAX_LISTED]]
            if len(self.damage) > MAX_LISTED:
                problems.append(f"... and {len(self.damage) - MAX_LISTED} more")
            return [*problems, "FAILED: the file is damaged; its log was not read"]
        rate = self.events / self.seconds if self.seconds > 0 else 0.0
        summary = (
            f"{self.events} events, {self.streams} streams, {self.commands} commands,"
            f" {self.products} products checked in {self.seconds:.1f} s ({rate:,.0f} events/s)"
        )
        if self.ok:
            return [summary, "OK: the log is consistent"]
        listed = sorted(self.violations)[:MAX_LISTED]
        out = [summary, *(f"position {v.position}: {v.problem}" for v in listed)]
        if self.violation_count > len(listed):
            out.append(f"... and {self.violation_count - len(listed)} more")
        first = listed[0]
        count = self.violation_count
        out.append(
            f"FAILED: {count} violation{'s' if count > 1 else ''},"
            f" the first at position {first.position}"
        )
        return out


@dataclass(slots=True)
class _Run:
    command_id: str
    first: int
    count: int
    events: list[tuple[str, DomainEvent]] | None = field(default_factory=list)
    """Its events, by stream id; None once one of them could not be read or decoded (the
    run is then not checked as a command's events)."""


class _Checker:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.expected_position = 1
        self.versions: dict[str, int] = {}
        self.stock: dict[str, int | None] = {}
        """By product stream; None while unknown (after an event that did not decode)."""
        self.rules = LogRules()
        self.run: _Run | None = None
        """The run of consecutive events of one command being read."""
        self.runs: list[CommandRange] = []

    def event(self, row: EventRow, readable: bool = True) -> None:
        """Check ``row``; one that could not be read (already reported, its bad text
        replaced) counts for the positions, versions and stock, but adds no violation of
        its own."""
        report = self.report
        event_id, stream_id, version, position, occurred_at, command_id, *_ = row
        event_type, data, schema = row[8:]
        report.events += 1
        # SQLite keeps whatever value a column is given (a hand edit, a damaged page):
        # what could not be served is reported, not left to fail the check or a client.
        if type(event_id) is not str or not _UUID.fullmatch(event_id):
            report.add(position, f"event id {event_id!r} is not a UUID")
        if type(stream_id) is not str:
            report.add(position, f"stream id {stream_id!r} is not text")
            stream_id = repr(stream_id)
        if type(command_id) is not str:
            report.add(position, f"command id {command_id!r} is not text")
            command_id = repr(command_id)
        if type(occurred_at) is not int or not (EARLIEST_TIME_US <= occurred_at <= LATEST_TIME_US):
            report.add(position, f"its time {occurred_at!r} is not a time")
        if type(version) is not int:
            report.add(position, f"{stream_id} version {version!r} is not a number")
            version = self.versions.get(stream_id, 0) + 1
        if position != self.expected_position:
            if position > self.expected_position:
                report.add(self.expected_position, f"missing (the next event is at {position})")
            else:
                report.add(
                    position, f"repeated or out of order (expected {self.expected_position})"
                )
        self.expected_position = max(self.expected_position, position + 1)

        last = self.versions.get(stream_id, 0)
        if version != last + 1:
            report.add(position, f"{stream_id} version {version} follows version {last}")
        self.versions[stream_id] = max(last, version)

        run = self.run
        if run is not None and run.command_id == command_id and run.first + run.count == position:
            run.count += 1
        else:
            self._close_run()
            run = self.run = _Run(command_id, position, 1)

        try:
            event = decode(event_type, schema, data)
        except Exception as error:
            if readable:
                reason = undecodable_reason(error)
                report.add(
                    position, f"{event_type} v{schema} ({event_id}) does not decode: {reason}"
                )
            run.events = None
            if stream_id in self.stock or stream_id.startswith(PRODUCT_STREAMS):
                self.stock[stream_id] = None
            return
        if readable:
            for problem in self.rules.event(stream_id, version, event):
                report.add(position, problem)
        else:
            run.events = None
        if run.events is not None:
            run.events.append((stream_id, event))
        if isinstance(event, ProductRestocked | StockReserved | StockReleased):
            self._stock(position, stream_id, event)

    def _stock(
        self, position: int, stream_id: str, event: ProductRestocked | StockReserved | StockReleased
    ) -> None:
        available = self.stock.get(stream_id, 0)
        # The recorded level is taken up again after a mismatch or an event that did not
        # decode: one damaged or missing event is one violation, not one per later event.
        self.stock[stream_id] = event.available_after
        if available is None:
            return
        available += -event.quantity if isinstance(event, StockReserved) else event.quantity
        if available < 0:
            self.report.add(position, f"{stream_id} stock goes negative ({available})")
        elif event.available_after != available:
            self.report.add(
                position,
                f"{stream_id} records {event.available_after} available, the replay {available}",
            )

    def _close_run(self) -> None:
        run = self.run
        if run is not None:
            self.runs.append((run.command_id, run.first, run.count))
            if run.events:
                for problem in self.rules.command(run.events):
                    self.report.add(run.first, problem)
            self.run = None

    def take_runs(self, final: bool) -> list[CommandRange]:
        if final:
            self._close_run()
        runs, self.runs = self.runs, []
        return runs


async def verify(store: EventStore) -> Report:
    """Check the whole log of ``store`` (see the module's docstring)."""
    if not isinstance(store, CommandLog):
        raise TypeError(f"{type(store).__name__} cannot list its command records")
    started = time.perf_counter()
    report = Report()
    if isinstance(store, FileCheck) and (damage := await store.file_damage()):
        report.damage = damage
        return report
    checker = _Checker(report)
    head = await store.head_position()
    # Grouped by the store (its reader thread or server) while the log is read and checked.
    repeats = asyncio.ensure_future(store.repeated_event_ids(head, MAX_LISTED))
    try:
        await _check_log(store, head, checker, report)
    except BaseException:
        await _abandon(repeats)
        raise
    # Read beside the log, and possibly still running when the log is done.
    for event_id, positions in await repeats:
        for position in positions[1:]:
            report.add(position, f"event id {event_id} is the id of position {positions[0]} too")
    report.seconds = time.perf_counter() - started
    return report


async def _check_log(store: EventStore, head: int, checker: _Checker, report: Report) -> None:
    """Every event up to ``head`` and every command record (``verify``)."""
    assert isinstance(store, CommandLog)
    after = 0
    recorded_runs = 0

    # The next page is read while this one is checked: the store's reader thread (or
    # server) and the checks overlap.
    def read_ahead(after: int) -> asyncio.Future[Sequence[EventRow]]:
        return asyncio.ensure_future(_read_rows(store, after, min(PAGE_SIZE, head - after)))

    upcoming = read_ahead(after)
    try:
        while True:
            try:
                rows = await upcoming
            except UndecodableRowError as damaged:
                # The rows before it are checked, the damaged one is reported, and the log is
                # read on after it.
                for row in damaged.before:
                    checker.event(row)
                report.add(damaged.position, f"cannot be read: {damaged.reason}")
                # What is left of it checked too, so that its damage is not also reported as
                # a gap, a broken command or a stock level off by its quantity.
                checker.event(damaged.row, readable=False)
                after = damaged.position
                if after >= head:
                    break
                upcoming = read_ahead(after)
                continue
            if not rows:
                break
            last = rows[-1][POSITION]
            if last <= after:
                # A store that pages by count, not by position, past a repeated position.
                report.add(last, "the log does not advance past this position")
                break
            after = last
            if after < head:
                upcoming = read_ahead(after)
            for row in rows:
                checker.event(row)
            recorded_runs += await _check_runs(store, checker.take_runs(final=False), report)
            if after >= head:
                break
    except BaseException:
        await _abandon(upcoming)
        raise
    if checker.expected_position <= head:
        report.add(checker.expected_position, f"missing (the head is {head})")
    recorded_runs += await _check_runs(store, checker.take_runs(final=True), report)
    report.commands = await _check_records(store, head, report)
    if report.commands > recorded_runs:
        await _find_stray_records(store, head, report)
    report.streams = len(checker.versions)
    report.products = len(checker.stock)


async def _abandon(task: asyncio.Future[Any]) -> None:
    """Give up ``task``, a read beside the check, when the check fails or is stopped:
    cancelled if still under way, waited for, and its own failure taken (as a rule the
    same lost store; the check's is the one reported), which asyncio would otherwise log
    with its traceback.

    Waited for, so that a read cancelled by a Ctrl-C ends before the command does: on
    PostgreSQL the driver then cancels its query on the server, which takes a round trip.
    Left running, the read was cancelled again as ``asyncio.run`` closed its loop, and
    psycopg logged "query cancellation interrupted" and dropped the connection.
    """
    # A read the check was awaiting has been cancelled with it already: once more would
    # interrupt the driver's own cancellation.
    if not task.done() and not (isinstance(task, asyncio.Task) and task.cancelling()):
        task.cancel()
    await asyncio.wait((task,))
    if not task.cancelled():
        task.exception()


async def _read_rows(store: EventStore, after: int, limit: int) -> Sequence[EventRow]:
    if isinstance(store, EventRowReader):
        return await store.read_all_rows(after, limit)
    return [
        (r.event_id, r.stream_id, r.stream_version, r.position, 0, r.command_id,
         r.correlation_id, r.user_id, r.event_type, r.data, r.schema_version)
        for r in await store.read_all(after, limit)
    ]  # fmt: skip


async def _check_runs(store: CommandLog, runs: Sequence[CommandRange], report: Report) -> int:
    """Each run of one command's events has the record that points at exactly it.
    Returns how many runs had a record, matching or not."""
    if not runs:
        return 0
    recorded = await store.find_command_ranges(sorted({command_id for command_id, _, _ in runs}))
    for command_id, first, count in runs:
        found = recorded.get(command_id)
        if found is None:
            report.add(first, f"command {command_id} has events but no record")
        elif found != (first, count):
            at, length = found
            if type(at) is not int or type(length) is not int:
                report.add(
                    first,
                    f"command {command_id}: its record's first position {at!r} and count"
                    f" {length!r} are not both numbers",
                )
                continue
            report.add(
                first,
                f"command {command_id}: events at {first}..{first + count - 1},"
                f" its record says {at}..{at + length - 1}",
            )
    return sum(1 for command_id, _, _ in runs if command_id in recorded)


async def _records(
    store: CommandLog, head: int, past: list[CommandRecordRow] | None = None
) -> AsyncIterator[list[CommandRecordRow]]:
    """Every command record committed before the check started, in pages (and any whose
    first position is no number, which cannot be placed); the others, if ``past`` is
    given, added to it."""
    after = ""
    while page := await store.read_command_records(after, PAGE_SIZE):
        yield [record for record in page if type(record[1]) is not int or record[1] <= head]
        if past is not None:
            past.extend(record for record in page if type(record[1]) is int and record[1] > head)
        after = page[-1][0]


async def _check_records(store: CommandLog, head: int, report: Report) -> int:
    """Reports the records whose id or fingerprint is damaged (each fingerprint checked as
    its command's retry would read it), and those that point past the log's end; returns
    how many records there are, of commands committed before the check started."""
    counted = 0
    past: list[CommandRecordRow] = []
    async for page in _records(store, head, past):
        counted += len(page)
        for command_id, first, _, recorded_fingerprint in page:
            at = first if type(first) is int else 0
            if not _is_text(command_id):
                report.add(at, f"command record {_shown(command_id)}: its id is not UTF-8 text")
            elif not is_well_formed(recorded_fingerprint):
                report.add(
                    at,
                    f"command {command_id}: its fingerprint {_shown(recorded_fingerprint)!r} is"
                    " damaged (a retry would be refused as another request)",
                )
    if past:
        # Past the head the check started from, a record is another command's, committed
        # since (in the transaction of its events), unless it points past the head even
        # now: then its events are not there, and a retry would replay no event, or the
        # events of whatever command is committed at those positions next.
        end = await store.head_position()
        for command_id, first, _, _ in past:
            if first > end:
                report.add(
                    first,
                    f"command record {_shown(command_id)} points past the end of the log"
                    f" (the head is {end})",
                )
    return counted


def _is_text(stored: str) -> bool:
    """Whether ``stored`` was read as UTF-8 (not with ``surrogateescape``'s stand-ins)."""
    try:
        stored.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(stored: str) -> str:
    """``stored`` as it can be printed: bytes that were not UTF-8 as U+FFFD."""
    return stored.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


async def _find_stray_records(store: EventStore, head: int, report: Report) -> None:
    """More records than commands with events: some record's command has no event, and
    the record points at another command's events or at none. The failure path only:
    one read per record."""
    assert isinstance(store, CommandLog)
    async for page in _records(store, head):
        for command_id, first, count, _ in page:
            shown = _shown(command_id)
            if type(first) is not int or type(count) is not int:
                report.add(
                    first if type(first) is int else 0,
                    f"command record {shown}: its first position {first!r} and count"
                    f" {count!r} are not both numbers",
                )
                continue
            rows = await _readable_rows(store, first - 1, 1) if first >= 1 else []
            if not rows or rows[0][POSITION] != first or count < 1:
                report.add(max(first, 1), f"command record {shown} points at no event")
            elif (owner := rows[0][COMMAND_ID]) != command_id:
                report.add(first, f"command record {shown} points at an event of {owner}")


async def _readable_rows(store: EventStore, after: int, limit: int) -> Sequence[EventRow]:
    """``_read_rows``, an unreadable row (already reported) with its bad text replaced."""
    try:
        return await _read_rows(store, after, limit)
    except UndecodableRowError as damaged:
        return [*damaged.before, damaged.row][:limit]


async def run_verify(url: str) -> int:
    """``order-gateway verify``: prints the report; 0 if the log is consistent, else 1,
    whether or not the report could be written (``| head`` must not turn a failed check
    into a pass)."""
    if is_memory_url(url):
        print(
            f"order-gateway: {url} is a store of the process that opens it: there is no log"
            " to verify",
            file=sys.stderr,
        )
        return 2
    if not await holds_a_store(url):
        # Opening it would create an empty store, and a mistyped path or database name
        # would pass as a consistent log.
        path = sqlite_path(url)
        missing = (
            f"SQLite store at {path}"
            if path and not path.is_file()
            else f"gateway schema in {path or redacted_url(url)}"
        )
        print(f"order-gateway: no {missing}", file=sys.stderr)
        return 1
    # Only read: a copy that may not be written (a restored backup) is verified too.
    store = await open_store(url, writable=False)
    try:
        report = await verify(store)
    finally:
        await store.close()
    try:
        for line in report.lines():
            print(line)
        sys.stdout.flush()
    except UnwritableOutputError as error:
        written = unwritable_output("order-gateway", error, "the output")
        return written if report.ok else 1
    return 0 if report.ok else 1
