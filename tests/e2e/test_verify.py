"""``order-gateway verify``: a consistent log passes; each kind of damage is found and
named by its first offending position, with a non-zero exit."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import cast

import psycopg
import pytest

import server.verify
from domain.commands import CancelOrder
from domain.errors import InsufficientInventoryError, StoreUnavailableError
from domain.mapper import to_domain_event
from domain.ports import RecordedEvent
from server.bootstrap import bootstrap
from server.cli import main
from server.stores import postgres_schema, sqlite_schema
from server.stores.factory import open_store
from server.stores.memory import MemoryEventStore
from server.verify import verify
from tests.fixtures import make_store_v1 as fixture
from tests.postgres_databases import new_role
from tests.unit.test_bus import create, restock

FIXTURE = Path(__file__).parents[1] / "fixtures" / "store-v1.db"
SECOND_ORDER = fixture.ORDERS[1][0]
CANCEL = "5f0e7a58-2000-4000-8000-000000000001"
"""The fixture (13 events): 1-3 restocks of apple, pear, plum; 4-6, 7-8 and 9-11 three
orders with their reservations; 12-13 the cancel of the second order."""


@pytest.fixture
def store_file(tmp_path: Path) -> Path:
    copy = tmp_path / "events.db"
    shutil.copyfile(FIXTURE, copy)
    assert main(["migrate", "--store", f"sqlite:///{copy}"]) == 0
    return copy


def damage(path: Path, *statements: str) -> None:
    with closing(sqlite3.connect(path)) as connection, connection:
        for statement in statements:
            connection.execute(statement)


def payload(path: Path, position: int) -> dict[str, object]:
    with closing(sqlite3.connect(path)) as connection:
        (data,) = connection.execute(
            "SELECT data FROM events WHERE position = ?", (position,)
        ).fetchone()
    loaded: dict[str, object] = json.loads(data)
    return loaded


def set_payload(path: Path, position: int, **changes: object) -> None:
    data = json.dumps({**payload(path, position), **changes})
    damage(path, f"UPDATE events SET data = '{data}' WHERE position = {position}")


def run_verify(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["verify", "--store", f"sqlite:///{path}"])
    return code, capsys.readouterr().out.splitlines()


def test_a_consistent_log_passes(store_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run_verify(store_file, capsys)
    assert code == 0
    assert lines[0].startswith("13 events, 6 streams, 7 commands, 3 products checked")
    assert lines[-1] == "OK: the log is consistent"


@pytest.mark.parametrize(
    ("statements", "expected", "first"),
    [
        pytest.param(
            ["UPDATE events SET position = position + 100 WHERE position >= 10",
             "UPDATE events SET position = position - 99 WHERE position >= 100"],
            "position 10: missing (the next event is at 11)", 9, id="gap",
        ),
        pytest.param(
            ["UPDATE events SET stream_version = 9 WHERE position = 8"],
            "position 8: product-apple version 9 follows version 2", 8, id="stream-version",
        ),
        pytest.param(
            ["UPDATE events SET data = X'7b7d' WHERE position = 7"],
            "position 7: OrderCreated v1", 7, id="undecodable",
        ),
        pytest.param(
            ["UPDATE events SET schema_version = 3 WHERE position = 4"],
            "position 4: OrderCreated v3", 4, id="unknown-version",
        ),
        pytest.param(
            [f"DELETE FROM commands WHERE command_id = '{SECOND_ORDER}'"],
            f"position 7: command {SECOND_ORDER} has events but no record", 7, id="no-record",
        ),
        pytest.param(
            [f"UPDATE commands SET first_position = 1 WHERE command_id = '{CANCEL}'"],
            f"position 12: command {CANCEL}: events at 12..13, its record says 1..2", 12,
            id="record-elsewhere",
        ),
        pytest.param(
            ["INSERT INTO commands VALUES ('ghost', 'f', 2, 1)"],
            "position 2: command record ghost points at an event of", 2, id="stray-record",
        ),
        pytest.param(
            ["INSERT INTO commands VALUES ('ghost', 'f', 14, 2)"],
            "position 14: command record ghost points past the end of the log (the head is"
            " 13)", 14, id="record-past-the-end",
        ),
        pytest.param(
            ["UPDATE events SET event_id = (SELECT event_id FROM events WHERE position = 1)"
             " WHERE position IN (2, 9)"],
            "position 2: event id ", 2, id="repeated-event-id",
        ),
        pytest.param(
            ["UPDATE events SET event_id = 'not-a-uuid' WHERE position = 3"],
            "position 3: event id 'not-a-uuid' is not a UUID", 3, id="event-id-not-a-uuid",
        ),
        # Values of the wrong kind, which SQLite keeps where a column asks for another
        # (its integrity check passes them): each would fail a client's read or retry.
        pytest.param(
            ["UPDATE events SET occurred_at_us = 'yesterday' WHERE position = 6"],
            "position 6: its time 'yesterday' is not a time", 6, id="time-not-a-number",
        ),
        pytest.param(
            ["UPDATE events SET occurred_at_us = 9223372036854775807 WHERE position = 6"],
            "position 6: its time 9223372036854775807 is not a time", 6, id="time-out-of-range",
        ),
        pytest.param(
            ["UPDATE events SET stream_version = 'abc' WHERE position = 8"],
            "position 8: product-apple version 'abc' is not a number", 8,
            id="version-not-a-number",
        ),
        pytest.param(
            [f"UPDATE commands SET event_count = 'two' WHERE command_id = '{CANCEL}'"],
            f"position 12: command {CANCEL}: its record's first position 12 and count 'two'",
            12, id="count-not-a-number",
        ),
        pytest.param(
            [f"UPDATE commands SET first_position = 'x' WHERE command_id = '{CANCEL}'"],
            f"position 12: command {CANCEL}: its record's first position 'x' and count 2", 12,
            id="first-position-not-a-number",
        ),
        pytest.param(
            [f"UPDATE commands SET fingerprint = '2:0000' WHERE command_id = '{CANCEL}'"],
            f"position 12: command {CANCEL}: its fingerprint '2:0000' is damaged", 12,
            id="fingerprint-damaged",
        ),
        pytest.param(
            ["UPDATE commands SET fingerprint = CAST(X'41ff42' AS TEXT)"
             f" WHERE command_id = '{CANCEL}'"],
            f"position 12: command {CANCEL}: its fingerprint 'A\ufffdB' is damaged", 12,
            id="fingerprint-not-utf8",
        ),
        pytest.param(
            ["UPDATE commands SET command_id = CAST(X'41ff42' AS TEXT)"
             f" WHERE command_id = '{CANCEL}'"],
            "position 12: command record A\ufffdB: its id is not UTF-8 text", 12,
            id="command-id-not-utf8",
        ),
    ],
)  # fmt: skip
def test_damage_is_found_at_its_first_position(
    store_file: Path,
    capsys: pytest.CaptureFixture[str],
    statements: list[str],
    expected: str,
    first: int,
) -> None:
    damage(store_file, *statements)
    code, lines = run_verify(store_file, capsys)
    assert code == 1
    assert any(line.startswith(expected) for line in lines), lines
    assert lines[-1].endswith(f"the first at position {first}"), lines


@pytest.mark.parametrize(
    ("data", "version", "why"),
    [
        # The fixture's events are stored in their first shapes, which are upcast.
        ("'{\"order_id\": broken'", 1, "expected value at line 1 column 14"),
        ("'{}'", 1, "KeyError: 'items'"),
        ("'{\"order_id\": broken'", 2, "Invalid JSON: expected value at line 1 column 14"),
        ("'{}'", 2, "order_id: Field required (and 4 more)"),
    ],
)
def test_an_undecodable_payload_is_said_what_is_wrong_with_it(
    store_file: Path, capsys: pytest.CaptureFixture[str], data: str, version: int, why: str
) -> None:
    damage(
        store_file,
        f"UPDATE events SET data = {data}, schema_version = {version} WHERE position = 7",
    )
    code, lines = run_verify(store_file, capsys)
    assert code == 1
    assert [line.partition(" does not decode: ")[2] for line in lines if "decode" in line] == [why]


def test_an_unreadable_row_beside_a_missing_one_is_reported_with_it(
    store_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A missing event sends verify looking for the command records that point nowhere,
    # which reads the unreadable row again.
    damage(
        store_file,
        "UPDATE events SET correlation_id = CAST(X'41ff42' AS TEXT) WHERE position = 5",
        "DELETE FROM events WHERE position = 12",
    )
    code, lines = run_verify(store_file, capsys)
    assert code == 1
    assert any(line.startswith("position 5: cannot be read") for line in lines), lines
    assert any(line.startswith("position 12: missing") for line in lines), lines
    assert lines[-1].endswith("the first at position 5"), lines


@pytest.mark.parametrize(
    ("column", "first"),
    [
        ("correlation_id", 5),
        ("stream_id", 5),
        ("event_type", 5),
        # Its command's record, 4..6, no longer matches the events that carry its id.
        ("command_id", 4),
    ],
)
def test_a_row_whose_text_is_not_utf8_is_reported_and_the_rest_checked(
    store_file: Path, capsys: pytest.CaptureFixture[str], column: str, first: int
) -> None:
    # Bytes a damaged page can hold, where SQLite keeps text; and a later event damaged
    # otherwise, which the check must still reach.
    damage(
        store_file,
        f"UPDATE events SET {column} = CAST(X'41ff42' AS TEXT) WHERE position = 5",
        "UPDATE events SET data = X'7b7d' WHERE position = 10",
    )
    code, lines = run_verify(store_file, capsys)
    assert code == 1
    assert lines[0].startswith("13 events,"), lines
    assert any(
        line.startswith("position 5: cannot be read: Could not decode to UTF-8") for line in lines
    ), lines
    assert any(line.startswith("position 10: StockReserved v1") for line in lines), lines
    assert lines[-1].endswith(f"the first at position {first}"), lines


FIRST_ORDER = "01a23acd-9af2-7fe3-bf8d-142573733c9e"
CANCELLED_ORDER = "01a23acd-9af3-7892-8c92-e08521fe5a8b"
THIRD_ORDER = "01a23acd-9af4-7ca1-9bc9-5efcb002d9bb"
OTHER_ORDER = "0f9a8b7c-0000-4000-8000-000000000009"


def items_with(path: Path, position: int, **changes: object) -> list[dict[str, object]]:
    """The items of the OrderCreated at ``position``, the first one changed."""
    items = cast(list[dict[str, object]], payload(path, position)["items"])
    return [{**items[0], **changes}, *items[1:]]


@pytest.mark.parametrize(
    ("position", "changes", "expected"),
    [
        pytest.param(
            7, lambda path: {"items": items_with(path, 7, quantity=9)},
            [f"position 7: order {CANCELLED_ORDER} reserves apple x 2 for its items apple x 9",
             f"position 7: order {CANCELLED_ORDER}: total 2.5 EUR is not the sum of its lines"
             " (11.25 EUR)",
             f"position 12: order {CANCELLED_ORDER} releases apple x 2, not its items"],
            id="ordered-quantity",
        ),
        pytest.param(
            4, lambda path: {"order_id": OTHER_ORDER},
            [f"position 4: OrderCreated of order-{OTHER_ORDER} is in stream order-{FIRST_ORDER}",
             f"position 4: StockReserved of apple for order {FIRST_ORDER}, in a command of"
             f" order {OTHER_ORDER}"],
            id="order-id",
        ),
        pytest.param(
            10, lambda path: {"order_id": FIRST_ORDER},
            [f"position 9: StockReserved of pear for order {FIRST_ORDER}, in a command of"
             f" order {THIRD_ORDER}"],
            id="reserved-for-another-order",
        ),
        pytest.param(
            4, lambda path: {"total": {"currency_code": "EUR", "units": 8, "nanos": 750000000}},
            [f"position 4: order {FIRST_ORDER}: total 8.75 EUR is not the sum of its lines"
             " (7.75 EUR)"],
            id="total",
        ),
        pytest.param(
            4, lambda path: {"items": items_with(
                path, 4, unit_price={"currency_code": "USD", "units": 1, "nanos": 250000000})},
            [f"position 4: order {FIRST_ORDER}: apple is priced in USD, the order in EUR"],
            id="currency",
        ),
        pytest.param(
            13, lambda path: {"quantity": 5, "available_after": 50},
            [f"position 12: order {CANCELLED_ORDER} releases apple x 5, not its items"],
            id="released-quantity",
        ),
    ],
)  # fmt: skip
def test_events_that_disagree_with_each_other_are_found(
    store_file: Path,
    capsys: pytest.CaptureFixture[str],
    position: int,
    changes: Callable[[Path], dict[str, object]],
    expected: list[str],
) -> None:
    # Each payload still decodes and every stock level adds up: only the events' own
    # agreement tells the edit.
    set_payload(store_file, position, **changes(store_file))
    code, lines = run_verify(store_file, capsys)
    assert code == 1
    for line in expected:
        assert line in lines, lines


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        pytest.param(
            f"UPDATE events SET stream_id = 'order-{OTHER_ORDER}' WHERE position = 12",
            f"position 12: OrderCancelled of order-{CANCELLED_ORDER} is in stream"
            f" order-{OTHER_ORDER}",
            id="stream",
        ),
        pytest.param(
            # The third order's stream: created, then created again.
            f"UPDATE events SET stream_id = 'order-{THIRD_ORDER}', stream_version = 2,"
            f" data = replace(data, '{FIRST_ORDER}', '{THIRD_ORDER}') WHERE position = 4",
            f"position 4: OrderCreated at version 2 of order-{THIRD_ORDER}, where only"
            " version 1 can be one",
            id="created-twice",
        ),
        pytest.param(
            "UPDATE events SET command_id = 'c0ffee00-0000-4000-8000-000000000000'"
            " WHERE position = 13",
            "position 13: a command's events (StockReleased) are not those of any command",
            id="command-shape",
        ),
    ],
)
def test_events_in_the_wrong_place_are_found(
    store_file: Path, capsys: pytest.CaptureFixture[str], statement: str, expected: str
) -> None:
    damage(store_file, statement)
    code, lines = run_verify(store_file, capsys)
    assert code == 1
    assert expected in lines, lines


def test_a_missing_stock_event_is_one_stock_violation(
    store_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Apple's first reservation (3) is gone: the next apple event records 45 where the
    # replay has 48; from there the replay goes on from 45, and the release at 13 adds up.
    damage(store_file, "DELETE FROM events WHERE position = 5")
    code, lines = run_verify(store_file, capsys)
    assert code == 1
    assert "position 8: product-apple records 45 available, the replay 48" in lines
    assert not [line for line in lines if line.startswith("position 13:")], lines


def test_an_unreadable_event_type_is_one_violation(
    store_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its stock change is unknown: the product's next event sets the level again.
    damage(store_file, "UPDATE events SET event_type = CAST(X'41ff42' AS TEXT) WHERE position = 5")
    code, lines = run_verify(store_file, capsys)
    assert code == 1
    assert lines[-1] == "FAILED: 1 violation, the first at position 5", lines


def test_stock_that_goes_negative_is_found(
    store_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    set_payload(store_file, 1, quantity=1, available_after=1)  # apple: 1 instead of 50
    code, lines = run_verify(store_file, capsys)
    assert code == 1
    assert "position 5: product-apple stock goes negative (-2)" in lines
    assert lines[-1].endswith("the first at position 5")


def test_a_recorded_stock_level_the_replay_disagrees_with_is_found(
    store_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    set_payload(store_file, 10, available_after=15)
    code, lines = run_verify(store_file, capsys)
    assert code == 1
    assert "position 10: product-pear records 15 available, the replay 14" in lines


async def test_a_repeated_position_is_found(tmp_path: Path) -> None:
    store = MemoryEventStore()
    bus = bootstrap(store)
    await bus.dispatch(restock("a", 5))
    await bus.dispatch(create(("a", 1)))
    assert (await verify(store)).ok
    store._events.insert(1, store._events[1])  # position 2 twice: the log a reader would see

    report = await verify(store)
    assert not report.ok
    assert report.first is not None and report.first.position == 2
    assert any("repeated or out of order (expected 3)" in v.problem for v in report.violations)


async def test_the_log_the_commands_write_passes_every_check() -> None:
    # The rules restate what the aggregates do: orders of one to three items, refused
    # orders, cancels of earlier orders and restocks between them.
    store = MemoryEventStore()
    bus = bootstrap(store)
    for product in ("a", "b", "c"):
        await bus.dispatch(restock(product, 20))
    open_orders: list[str] = []
    for n in range(30):
        items = [("a", 1 + n % 4), ("b", 2), ("c", 1)][: 1 + n % 3]
        try:
            created = await bus.dispatch(create(*items))
        except InsufficientInventoryError:
            await bus.dispatch(restock(items[0][0], 10))
            continue
        open_orders.append(to_domain_event(created[0]).order_id)  # type: ignore[attr-defined]
        if n % 2:
            await bus.dispatch(CancelOrder(order_id=open_orders.pop(0), by_admin=True))
    report = await verify(store)
    assert report.ok, report.lines()
    assert report.commands > 40


class SlowSearchForRepeatedIds(MemoryEventStore):
    """Searches for repeated event ids slower than the log is read, as a big or busy
    PostgreSQL database does."""

    async def repeated_event_ids(self, head: int, limit: int) -> list[tuple[str, list[int]]]:
        await asyncio.sleep(0.2)
        return await super().repeated_event_ids(head, limit)


@pytest.mark.parametrize("repeated", [False, True], ids=["sound", "repeated-id"])
async def test_the_search_for_repeated_ids_may_end_after_the_log_is_read(repeated: bool) -> None:
    store = SlowSearchForRepeatedIds()
    bus = bootstrap(store)
    await bus.dispatch(restock("a", 5))
    await bus.dispatch(create(("a", 1)))
    if repeated:
        store._events[2] = dataclasses.replace(store._events[2], event_id=store._events[0].event_id)

    report = await verify(store)
    assert report.ok is not repeated
    if repeated:
        assert any("is the id of position 1 too" in v.problem for v in report.violations)


class LostMidway(MemoryEventStore):
    """A store whose connection is lost once the first command's events are read
    (PostgreSQL restarted, or the connection ended by an administrator): every later read
    fails, each after a round trip, so that reads under way fail too."""

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        if after_position > 1:
            await asyncio.sleep(0)
            raise StoreUnavailableError("PostgreSQL is unavailable (read_all): lost")
        return await super().read_all(after_position, limit)

    async def find_command_ranges(self, command_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        await asyncio.sleep(0)
        raise StoreUnavailableError("PostgreSQL is unavailable (find_command): lost")

    async def repeated_event_ids(self, head: int, limit: int) -> list[tuple[str, list[int]]]:
        await asyncio.sleep(0)
        raise StoreUnavailableError("PostgreSQL is unavailable (repeated_ids): lost")


async def test_a_store_lost_midway_fails_the_check_with_its_own_error_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The reads verify runs beside the check failed with it, and asyncio logged each
    # one's traceback ("Task exception was never retrieved") under the error's one line.
    monkeypatch.setattr(server.verify, "PAGE_SIZE", 1)
    store = LostMidway()
    bus = bootstrap(store)
    await bus.dispatch(restock("a", 5))
    await bus.dispatch(create(("a", 1)))
    with pytest.raises(StoreUnavailableError, match="find_command"):
        await verify(store)
    await asyncio.sleep(0)
    gc.collect()
    assert "never retrieved" not in caplog.text


class CancelledOnTheServer(MemoryEventStore):
    """A store whose reads of the log past its second event, and whose searches for
    command records, are under way until cancelled; a read's cancellation then takes a
    round trip, as a PostgreSQL query's does."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()
        self.searching = asyncio.Event()
        self.read_cancellations: list[str] = []

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        if after_position < 2:
            return await super().read_all(after_position, limit)
        self.reading.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                self.read_cancellations.append("interrupted")
                raise
            self.read_cancellations.append("completed")
            raise
        raise AssertionError("not reached")

    async def find_command_ranges(self, command_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        self.searching.set()
        await asyncio.Event().wait()
        raise AssertionError("not reached")


async def test_a_stopped_check_ends_after_the_reads_it_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Ctrl-C cancels the check while it searches for command records and reads the
    # next page beside. The read went on with its own cancellation after the check ended,
    # and was cancelled again as asyncio.run closed the loop: on PostgreSQL psycopg then
    # logged "query cancellation interrupted (CancelledError): closing connection".
    monkeypatch.setattr(server.verify, "PAGE_SIZE", 1)
    store = CancelledOnTheServer()
    bus = bootstrap(store)
    await bus.dispatch(restock("a", 5))
    await bus.dispatch(create(("a", 1)))
    check = asyncio.create_task(verify(store))
    await asyncio.wait_for(store.reading.wait(), 5)
    await asyncio.wait_for(store.searching.wait(), 5)
    check.cancel()
    with pytest.raises(asyncio.CancelledError):
        await check
    assert store.read_cancellations == ["completed"]


def test_a_store_that_does_not_exist_fails_and_is_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A mistyped path must not pass as an empty, consistent log (nor leave a new file).
    missing = tmp_path / "typo.db"
    assert main(["verify", "--store", f"sqlite:///{missing}"]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert f"no SQLite store at {missing}" in printed.err
    assert not missing.exists()


def test_a_directory_is_no_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "stores"
    folder.mkdir()
    assert main(["verify", "--store", f"sqlite:///{folder}"]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert f"no SQLite store at {folder}" in printed.err
    assert list(folder.iterdir()) == []


def foreign_database(path: Path) -> None:
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("CREATE TABLE notes (body TEXT)")


def foreign_events_table(path: Path) -> None:
    """Another program's database, whose table happens to be named ``events``."""
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("CREATE TABLE events (x)")
        connection.execute("INSERT INTO events VALUES (1)")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(Path.touch, id="empty-file"),
        pytest.param(foreign_database, id="other-schema"),
        pytest.param(foreign_events_table, id="other-events-table"),
    ],
)
def test_a_sqlite_file_without_the_schema_fails_and_is_not_migrated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], None]
) -> None:
    # A backup truncated to nothing, or another program's database, is not an empty log.
    path = tmp_path / "other.db"
    make(path)
    before = path.read_bytes()
    assert main(["verify", "--store", f"sqlite:///{path}"]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert f"no gateway schema in {path}" in printed.err
    assert path.read_bytes() == before


def versioned_foreign_database(path: Path) -> None:
    """Another program's database that records its own schema version, as the gateway
    does, in ``PRAGMA user_version``."""
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("PRAGMA user_version = 2")
        connection.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY)")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(foreign_database, id="other-schema"),
        pytest.param(foreign_events_table, id="other-events-table"),
        pytest.param(versioned_foreign_database, id="other-schema-versioned"),
    ],
)
def test_another_program_s_sqlite_file_is_not_made_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], None]
) -> None:
    # A mistyped path: the gateway's tables were added beside the other program's, and
    # the file was switched to WAL (for good) before it was refused, with its -wal and
    # -shm made beside it (serve opens its store the same way).
    path = tmp_path / "other.db"
    make(path)
    before = path.read_bytes()
    assert main(["migrate", "--store", f"sqlite:///{path}"]) == 1
    printed = capsys.readouterr()
    assert f"cannot open the SQLite store {path}: the file holds another program's" in printed.err
    assert path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [path]


def versioned_empty_database(path: Path) -> None:
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("PRAGMA user_version = 3")


def store_without_commands(path: Path) -> None:
    asyncio.run(close_new_store(path))
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("DROP TABLE commands")


def store_without_schema_versions(path: Path) -> None:
    asyncio.run(close_new_store(path))
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("ALTER TABLE events DROP COLUMN schema_version")


async def close_new_store(path: Path) -> None:
    await (await open_store(f"sqlite:///{path}")).close()


@pytest.mark.parametrize(
    ("make", "lacking"),
    [
        pytest.param(versioned_empty_database, "(commands, events, snapshots)", id="no-tables"),
        pytest.param(store_without_commands, "(commands)", id="table-dropped"),
        pytest.param(store_without_schema_versions, "(events.schema_version)", id="column-dropped"),
    ],
)
@pytest.mark.parametrize("command", ["migrate", "verify"])
def test_a_file_without_the_tables_of_its_schema_version_is_refused_and_left_as_it_was(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], None],
    lacking: str,
    command: str,
) -> None:
    # Was migrated from the version it claims, missing tables and all (a store that lost
    # its commands table served until its first write failed), and verify found "no
    # gateway schema" in it, which did not say what was wrong.
    path = tmp_path / "marked.db"
    make(path)
    before = path.read_bytes()
    assert main([command, "--store", f"sqlite:///{path}"]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert f"cannot open the SQLite store {path}: the file is marked schema version" in printed.err
    assert f"but lacks tables or columns that version has {lacking}" in printed.err
    assert path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [path]


def test_a_file_that_holds_tables_of_a_later_schema_version_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Migrating it would fail on the table already there, once the file was in WAL mode.
    path = tmp_path / "clash.db"
    with closing(sqlite3.connect(path)) as connection, connection:
        for statement in (*sqlite_schema.MIGRATIONS[0], *sqlite_schema.MIGRATIONS[2]):
            connection.execute(statement)
        connection.execute("PRAGMA user_version = 1")
    before = path.read_bytes()
    assert main(["migrate", "--store", f"sqlite:///{path}"]) == 1
    assert "already holds tables or columns that later versions add (snapshots)" in (
        capsys.readouterr().err
    )
    assert path.read_bytes() == before


@pytest.mark.parametrize("command", ["migrate", "verify"])
def test_a_store_whose_version_was_lowered_below_its_columns_is_refused_and_left_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # Migrating it failed on the column already there, with SQLite's own message
    # ("duplicate column name: retry_at_us"), which named no version.
    path = tmp_path / "lowered.db"
    asyncio.run(close_new_store(path))
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute(f"PRAGMA user_version = {sqlite_schema.LATEST_VERSION - 1:d}")
    before = path.read_bytes()
    assert main([command, "--store", f"sqlite:///{path}"]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert (
        f"cannot open the SQLite store {path}: the file is marked schema version"
        f" {sqlite_schema.LATEST_VERSION - 1} (PRAGMA user_version) but already holds tables"
        " or columns that later versions add (consumer_group_attempts.retry_at_us)"
    ) in printed.err
    assert path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [path]


BOUND_BY_PERMISSIONS = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
"""Root without the capabilities that let it past file permissions: a user's view."""

needs_root_and_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="drops root's permission overrides with setpriv: needs root and util-linux",
)


def order_gateway_bound_by_permissions(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BOUND_BY_PERMISSIONS, sys.executable, "-m", "server", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_root_and_setpriv
def test_a_backup_kept_where_nothing_can_be_written_is_verified(store_file: Path) -> None:
    # Read-only media or directory: SQLite cannot make the -wal and -shm it reads a WAL
    # file through, so without being told that the file cannot change it reads nothing.
    shelf = store_file.parent / "shelf"
    shelf.mkdir()
    copy = shelf / "copy.db"
    assert main(["backup", "--store", f"sqlite:///{store_file}", str(copy)]) == 0
    shelf.chmod(0o555)
    try:
        verified = order_gateway_bound_by_permissions("verify", "--store", f"sqlite:///{copy}")
    finally:
        shelf.chmod(0o755)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.splitlines()[-1] == "OK: the log is consistent"
    assert sorted(shelf.iterdir()) == [copy]


@needs_root_and_setpriv
@pytest.mark.parametrize("command", ["verify", "migrate", "backup"])
def test_a_store_in_a_directory_that_may_not_be_searched_is_a_store_error(
    store_file: Path, command: str
) -> None:
    closed = store_file.parent / "closed"
    closed.mkdir()
    store = closed / "events.db"
    shutil.copyfile(store_file, store)
    arguments = [command, "--store", f"sqlite:///{store}"]
    if command == "backup":
        arguments.append(str(store_file.parent / "copy.db"))
    closed.chmod(0o600)
    try:
        refused = order_gateway_bound_by_permissions(*arguments)
    finally:
        closed.chmod(0o755)
    assert refused.returncode == 1
    assert f"{store}: Permission denied" in refused.stderr
    assert refused.stderr.startswith(
        "order-gateway: cannot back up" if command == "backup" else "order-gateway: store error:"
    )


def test_a_truncated_store_is_reported_and_left_as_it_was(
    store_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store file cut short (a copy that did not finish): verify says so, exit 1, and
    leaves nothing beside it that was not there (no -wal or -shm of its own)."""
    with store_file.open("r+b") as file:
        file.truncate(2 * 4096)
    before = sorted(store_file.parent.iterdir())
    code = main(["verify", "--store", f"sqlite:///{store_file}"])
    assert code == 1
    assert "malformed" in capsys.readouterr().err
    assert sorted(store_file.parent.iterdir()) == before


def test_a_damaged_page_outside_the_log_is_found(
    store_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The consumer groups' parked events: no read of the log touches their pages, so only
    # SQLite's integrity check sees the damage (which the gateway would meet later).
    with closing(sqlite3.connect(store_file)) as connection:
        (root,) = connection.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'consumer_group_parked'"
        ).fetchone()
        (page_size,) = connection.execute("PRAGMA page_size").fetchone()
    with store_file.open("r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\x13" * page_size)
    code, lines = run_verify(store_file, capsys)
    assert code == 1
    assert any(line.startswith("file: ") for line in lines), lines
    assert lines[-1].startswith("FAILED: the file is damaged"), lines


def test_a_store_of_an_older_schema_is_refused_and_not_upgraded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # verify only reads: on SQLite an upgrade cannot be undone (an older release refuses
    # the file afterwards), so checking a store before an upgrade must not perform it.
    path = tmp_path / "old.db"
    shutil.copyfile(FIXTURE, path)
    before = path.read_bytes()
    assert main(["verify", "--store", f"sqlite:///{path}"]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert (
        f"schema version 1 is older than this gateway's ({sqlite_schema.LATEST_VERSION})"
        in printed.err
    )
    assert "order-gateway migrate" in printed.err
    assert path.read_bytes() == before
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA user_version").fetchone() == (1,)


def test_a_database_of_an_older_schema_is_refused_and_not_upgraded(
    fresh_postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(fresh_postgres_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
            " description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in postgres_schema.MIGRATIONS[:-1]:
            conn.execute(migration.sql)
            conn.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (%s, 'old')",
                (migration.version,),
            )
    assert main(["verify", "--store", fresh_postgres_url]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    latest = postgres_schema.MIGRATIONS[-1].version
    assert f"the database lacks schema migrations [{latest}]" in printed.err
    with psycopg.connect(fresh_postgres_url) as conn:
        row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
        assert row == (latest - 1,)


def test_a_database_without_the_schema_fails_and_is_not_migrated(
    fresh_postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A mistyped database name (an existing, empty database) must not pass either.
    assert main(["verify", "--store", fresh_postgres_url]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert f"no gateway schema in {fresh_postgres_url}" in printed.err
    with psycopg.connect(fresh_postgres_url) as conn:
        row = conn.execute("SELECT to_regclass('schema_migrations') IS NULL").fetchone()
        assert row == (True,)


def test_a_database_with_tables_of_the_gateways_names_but_not_its_schema_fails(
    fresh_postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Another framework's migrations table and a table of events of its own.
    with psycopg.connect(fresh_postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_migrations (version text PRIMARY KEY)")
        conn.execute("CREATE TABLE events (id serial PRIMARY KEY, body text)")
    assert main(["verify", "--store", fresh_postgres_url]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert f"no gateway schema in {fresh_postgres_url}" in printed.err
    with psycopg.connect(fresh_postgres_url) as conn:
        row = conn.execute("SELECT to_regclass('commands') IS NULL").fetchone()
        assert row == (True,)


def tables_and_columns(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT table_name::text, column_name::text FROM information_schema.columns"
            " WHERE table_schema = current_schema() ORDER BY 1, 2"
        ).fetchall()


@pytest.mark.parametrize(
    ("statements", "named"),
    [
        pytest.param(["CREATE TABLE events (x int)"], "events", id="events"),
        pytest.param(
            ["CREATE TABLE notes (body text)", "CREATE TABLE commands (id int)"],
            "commands",
            id="commands-beside-its-own",
        ),
        pytest.param(
            [
                "CREATE TABLE schema_migrations (version text PRIMARY KEY)",
                "CREATE TABLE events (id serial PRIMARY KEY, body text)",
            ],
            "events, schema_migrations",
            id="another-framework-s-migrations",
        ),
    ],
)
def test_another_program_s_tables_of_the_gateways_names_are_refused_before_anything_is_created(
    fresh_postgres_url: str, capsys: pytest.CaptureFixture[str], statements: list[str], named: str
) -> None:
    # The first migration failed on them: "PostgreSQL migrate failed: SQLSTATE 42P07
    # relation "events" already exists", which did not say whose the table was.
    with psycopg.connect(fresh_postgres_url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)
    before = tables_and_columns(fresh_postgres_url)
    assert main(["migrate", "--store", fresh_postgres_url]) == 1
    assert capsys.readouterr().err == (
        f"order-gateway: store error: the database holds another program's tables ({named}):"
        " give the gateway a database or schema of its own; see docs/operations.md\n"
    )
    assert tables_and_columns(fresh_postgres_url) == before


def test_a_schema_of_its_own_beside_another_program_s_tables_is_migrated(
    fresh_postgres_url: str,
) -> None:
    # The tables of the gateway's names in another schema of the search path are not in
    # the way: its own are created in the first one.
    with psycopg.connect(fresh_postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.events (x int)")
        conn.execute("CREATE SCHEMA gateway")
    url = f"{fresh_postgres_url}?options=-csearch_path%3Dgateway,public"
    assert main(["migrate", "--store", url]) == 0
    assert main(["verify", "--store", url]) == 0


def test_a_database_that_lost_a_table_is_said_to_be_incomplete(
    fresh_postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--store", fresh_postgres_url]) == 0
    with psycopg.connect(fresh_postgres_url, autocommit=True) as conn:
        conn.execute("DROP TABLE commands")
    capsys.readouterr()
    assert main(["verify", "--store", fresh_postgres_url]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert "the database's schema is incomplete: it lacks table commands," in printed.err


def test_a_role_that_may_only_read_the_log_verifies_it(
    fresh_postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--store", fresh_postgres_url]) == 0
    with new_role(fresh_postgres_url, "SELECT ON schema_migrations, events, commands") as as_role:
        assert main(["verify", "--store", as_role]) == 0
    assert "OK: the log is consistent" in capsys.readouterr().out


def test_a_role_that_may_not_read_the_tables_is_told_so_not_that_a_migration_failed(
    fresh_postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--store", fresh_postgres_url]) == 0
    capsys.readouterr()
    with new_role(fresh_postgres_url) as as_role:
        assert main(["verify", "--store", as_role]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert (
        "PostgreSQL read not permitted: permission denied for table schema_migrations;"
        " see docs/operations.md, Privileges"
    ) in printed.err
    assert "migrate" not in printed.err


def test_a_role_that_may_not_use_the_schema_is_told_so_not_that_there_is_no_schema(
    fresh_postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--store", fresh_postgres_url]) == 0
    capsys.readouterr()
    with new_role(fresh_postgres_url, "SELECT ON schema_migrations, events, commands") as as_role:
        with psycopg.connect(fresh_postgres_url, autocommit=True) as owner:
            owner.execute("REVOKE USAGE ON SCHEMA public FROM PUBLIC")
        assert main(["verify", "--store", as_role]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert "no gateway schema" not in printed.err
    assert (
        'may use no schema of its search_path ("$user", public): none of them exists or'
        " grants it USAGE; see docs/operations.md, Privileges"
    ) in printed.err


def test_a_migrated_database_with_no_events_is_consistent(
    fresh_postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--store", fresh_postgres_url]) == 0
    assert main(["verify", "--store", fresh_postgres_url]) == 0
    assert "OK: the log is consistent" in capsys.readouterr().out


async def three_restocks(url: str) -> None:
    store = await open_store(url)
    try:
        bus = bootstrap(store)
        for product in ("a", "b", "c"):
            await bus.dispatch(restock(product, 5))
    finally:
        await store.close()


def test_a_repeated_event_id_is_found_in_postgresql(
    fresh_postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(three_restocks(fresh_postgres_url))
    with psycopg.connect(fresh_postgres_url) as conn:
        row = conn.execute("SELECT event_id FROM events WHERE position = 1").fetchone()
        assert row is not None
        (first,) = row
        conn.execute("UPDATE events SET event_id = %s WHERE position = 3", (first,))
    assert main(["verify", "--store", fresh_postgres_url]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"position 3: event id {first} is the id of position 1 too" in lines
    assert lines[-1] == "FAILED: 1 violation, the first at position 3"


@pytest.mark.parametrize(
    ("statement", "expected", "first"),
    [
        # No gateway writes it; a hand edit can, and it failed the whole read before.
        ("UPDATE events SET occurred_at = 'infinity' WHERE position = 2",
         "position 2: its time None is not a time", 2),
        ("UPDATE commands SET fingerprint = 'garbage' WHERE first_position = 3",
         "its fingerprint 'garbage' is damaged", 3),
    ],
)  # fmt: skip
def test_values_that_could_not_be_served_are_found_in_postgresql(
    fresh_postgres_url: str,
    capsys: pytest.CaptureFixture[str],
    statement: str,
    expected: str,
    first: int,
) -> None:
    asyncio.run(three_restocks(fresh_postgres_url))
    with psycopg.connect(fresh_postgres_url) as conn:
        conn.execute(statement)
    assert main(["verify", "--store", fresh_postgres_url]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("3 events,"), lines
    assert any(line.startswith(f"position {first}: ") and expected in line for line in lines)
    assert lines[-1] == f"FAILED: 1 violation, the first at position {first}"


def on_a_new_store(tmp_path: Path, command: str) -> list[str]:
    """The arguments of ``command`` (``verify``, or ``backup`` to ``copy.db``) on a new
    store ``events.db`` in ``tmp_path``."""
    store = f"sqlite:///{tmp_path / 'events.db'}"
    assert main(["migrate", "--store", store]) == 0
    copy = [str(tmp_path / "copy.db")] if command == "backup" else []
    return [command, "--store", store, *copy]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("command", ["verify", "backup"])
def test_a_report_that_cannot_be_written_is_exit_1(tmp_path: Path, command: str) -> None:
    args = on_a_new_store(tmp_path, command)
    with open("/dev/full", "w") as full:
        finished = subprocess.run(
            [sys.executable, "-m", "server.cli", *args],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert finished.returncode == 1
    assert finished.stderr == "order-gateway: cannot write the output: No space left on device\n"


@pytest.mark.parametrize("command", ["verify", "backup"])
def test_a_closed_standard_output_is_exit_1_without_a_traceback(
    tmp_path: Path, command: str
) -> None:
    # Started with `>&-`, as a daemon's job may be: Python then has no sys.stdout at all.
    args = on_a_new_store(tmp_path, command)
    finished = subprocess.run(
        ["sh", "-c", 'exec "$0" "$@" >&-', sys.executable, "-m", "server.cli", *args],
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 1
    assert (
        finished.stderr == "order-gateway: cannot write the output: the standard output is closed\n"
    )


@pytest.mark.parametrize("damaged", [False, True], ids=["consistent", "damaged"])
def test_a_reader_that_went_away_leaves_the_exit_status_to_the_check(
    store_file: Path, damaged: bool
) -> None:
    # As `verify | head -1` when head has gone by the time the report is written: a
    # failed check must not pass for a script that tests the status.
    if damaged:
        damage(store_file, "DELETE FROM events WHERE position = 12")
    reader, writer = os.pipe()
    os.close(reader)
    try:
        finished = subprocess.run(
            [sys.executable, "-m", "server.cli", "verify", "--store", f"sqlite:///{store_file}"],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(writer)
    assert finished.returncode == (1 if damaged else 0), finished.stderr
    assert finished.stderr == ""


@pytest.mark.parametrize("url", ["memory://", "memory:"])
def test_the_memory_store_has_no_log_to_verify(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", "--store", url]) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert "there is no log to verify" in printed.err


@pytest.mark.parametrize("url", ["memory://", "memory:"])
def test_the_memory_store_has_no_schema_to_migrate(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 0 would tell a deployment script that a store was made ready."""
    assert main(["migrate", "--store", url]) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert "there is no schema to migrate" in printed.err
