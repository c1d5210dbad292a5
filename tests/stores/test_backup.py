"""``order-gateway backup``: a consistent copy of a SQLite store taken while the gateway
serves, which passes ``verify`` and serves as it is; PostgreSQL through pg_dump."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

import server.backup
from server.cli import main
from server.consumer_groups.model import FailedAttempts, GroupRecord, GroupSettings
from server.stores import sqlite_schema
from server.stores.postgres import PostgresEventStore
from server.stores.sqlite import SQLiteEventStore
from server.verify import verify
from tests.e2e.test_verify import (
    foreign_events_table,
    store_without_commands,
    store_without_schema_versions,
    versioned_foreign_database,
)
from tests.postgres_databases import new_database
from tests.subscription_support import (
    StreamReader,
    connect,
    identities,
    run_writers,
    running_gateway,
    stored,
)

WRITERS = 4
ORDERS = 60
"""Per writer: 4 x (1 + 2 x 60) = 484 events in all."""


async def test_a_copy_taken_under_load_is_consistent_and_serves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    store = await SQLiteEventStore.open(live)
    async with running_gateway(store) as gateway, connect(gateway) as clients:
        committed = asyncio.Event()
        store.add_commit_listener(committed.set)
        writers = asyncio.create_task(run_writers(clients, WRITERS, ORDERS))
        while await store.head_position() < 100:
            committed.clear()  # the writers keep committing: a wake-up lost here comes again
            await committed.wait()
        code = await asyncio.to_thread(main, ["backup", "--store", f"sqlite:///{live}", str(copy)])
        assert not writers.done(), "the copy must be taken while commands commit"
        await writers
        everything = await stored(store)
    assert code == 0
    assert len(everything) == WRITERS * (1 + 2 * ORDERS)

    copied = await SQLiteEventStore.open(copy)
    try:
        report = await verify(copied)
        assert report.ok, report.lines()
        in_copy = await stored(copied)
        assert 100 <= len(in_copy) < len(everything)
        assert in_copy == everything[: len(in_copy)], "a prefix of the log: whole commits"
        assert capsys.readouterr().out == f"backed up {len(in_copy)} events to {copy}\n"
    except BaseException:
        await copied.close()
        raise
    # The copy serves as it is: subscribers read it, new commands continue it.
    async with running_gateway(copied) as restored, connect(restored) as on_copy:
        head = len(in_copy)
        assert identities(await StreamReader.open(on_copy).through(head)) == in_copy
        restocked = await on_copy.restock("w-0", 1)
        assert restocked[0].position == head + 1


async def test_a_copy_keeps_the_consumer_groups_state(tmp_path: Path) -> None:
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    store = await SQLiteEventStore.open(live)
    groups = await store.open_consumer_groups()
    group = await groups.create_group(GroupRecord("g", GroupSettings(), dt.datetime.now(dt.UTC), 0))
    await groups.save_checkpoints(group, {0: 3})
    await groups.save_attempts(group, [FailedAttempts("e1", 4, 0, 2)])
    await groups.close()
    await store.close()
    assert await asyncio.to_thread(main, ["backup", "--store", f"sqlite:///{live}", str(copy)]) == 0

    copied = await SQLiteEventStore.open(copy)
    groups = await copied.open_consumer_groups()
    try:
        assert (await verify(copied)).ok
        assert await groups.load_checkpoints("g") == {0: 3}
        assert await groups.load_attempts("g", [0]) == [FailedAttempts("e1", 4, 0, 2)]
    finally:
        await groups.close()
        await copied.close()


def test_an_existing_file_is_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    assert main(["migrate", "--store", f"sqlite:///{live}"]) == 0
    copy.write_text("precious")
    assert main(["backup", "--store", f"sqlite:///{live}", str(copy)]) == 1
    assert "exists" in capsys.readouterr().err
    assert copy.read_text() == "precious"


def test_a_file_that_appears_while_the_copy_is_made_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    assert main(["migrate", "--store", f"sqlite:///{live}"]) == 0
    create = server.backup._create

    def another_writer_meanwhile(partial: Path, destination: Path, mode: int) -> sqlite3.Connection:
        destination.write_text("precious")
        return create(partial, destination, mode)

    monkeypatch.setattr(server.backup, "_create", another_writer_meanwhile)
    assert main(["backup", "--store", f"sqlite:///{live}", str(copy)]) == 1
    assert f"{copy} exists" in capsys.readouterr().err
    assert copy.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("live.db")] == ["copy.db"]


def test_the_copy_is_as_private_as_the_store(tmp_path: Path) -> None:
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    assert main(["migrate", "--store", f"sqlite:///{live}"]) == 0
    live.chmod(0o600)
    assert main(["backup", "--store", f"sqlite:///{live}", str(copy)]) == 0
    assert copy.stat().st_mode & 0o777 == 0o600


STOPPED_AS_IT_COPIES = """
import os, signal, sys
import server.backup
from server.launch import main

create = server.backup._create

def stopped_meanwhile(partial, destination, mode):
    os.kill(os.getpid(), getattr(signal, os.environ["STOP_SIGNAL"]))
    return create(partial, destination, mode)

server.backup._create = stopped_meanwhile
sys.exit(main(sys.argv[1:]))
"""


def backup_signalled_as_it_copies(
    tmp_path: Path, stop: str, preexec_fn: Callable[[], object] | None = None
) -> subprocess.CompletedProcess[str]:
    """``backup`` of a new store ``live.db`` to ``copy.db`` in ``tmp_path``, sent the signal
    named ``stop`` as it copies; started with ``preexec_fn`` run in the child, if given."""
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    assert main(["migrate", "--store", f"sqlite:///{live}"]) == 0
    return subprocess.run(
        [sys.executable, "-c", STOPPED_AS_IT_COPIES, "backup", "--store", f"sqlite:///{live}",
         str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "STOP_SIGNAL": stop},
        preexec_fn=preexec_fn,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("stop", "status"),
    [
        ("SIGTERM", 143),
        ("SIGHUP", 129),  # Its terminal closed: a dropped ssh connection.
    ],
)
def test_a_backup_stopped_by_a_signal_leaves_no_partial_copy(
    tmp_path: Path, stop: str, status: int
) -> None:
    stopped = backup_signalled_as_it_copies(tmp_path, stop)
    assert stopped.returncode == status, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("live.db")) == []


def test_a_backup_started_with_nohup_goes_on_when_its_terminal_closes(tmp_path: Path) -> None:
    finished = backup_signalled_as_it_copies(
        tmp_path, "SIGHUP", preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)
    )
    assert finished.returncode == 0, finished.stderr
    assert verify_ok(tmp_path / "copy.db")


def test_a_file_beside_the_destination_is_left_alone(tmp_path: Path) -> None:
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    assert main(["migrate", "--store", f"sqlite:///{live}"]) == 0
    mine = tmp_path / "copy.db.partial"
    mine.write_text("someone else's")
    assert main(["backup", "--store", f"sqlite:///{live}", str(copy)]) == 0
    assert mine.read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("live.db")) == [
        "copy.db",
        "copy.db.partial",
    ]


@pytest.mark.parametrize(
    ("file", "reason"),
    [
        ("no-such-folder/copy.db", "no directory {tmp}/no-such-folder"),
        ("a-file.txt/copy.db", "no directory {tmp}/a-file.txt"),
        ("backups/", "it names a directory, not a file"),
        ("backups/..", "it names a directory, not a file"),
        ("backups", "it names a directory, not a file"),
        ("n" * 256, "its name is too long"),
    ],
)
def test_a_destination_that_cannot_be_a_file_is_refused_by_its_name_before_copying(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str, reason: str
) -> None:
    live = tmp_path / "live.db"
    assert main(["migrate", "--store", f"sqlite:///{live}"]) == 0
    (tmp_path / "a-file.txt").write_text("notes")
    (tmp_path / "backups").mkdir()
    before = sorted(tmp_path.rglob("*"))
    assert main(["backup", "--store", f"sqlite:///{live}", f"{tmp_path}/{file}"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"order-gateway: cannot back up to {tmp_path}/{file}: "
        + reason.format(tmp=tmp_path)
        + "\n"
    )
    assert sorted(tmp_path.rglob("*")) == before


def test_an_empty_file_name_is_a_usage_error_that_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was "cannot back up to : it names a directory, not a file": "" is read as the
    # working directory, which nobody named.
    monkeypatch.chdir(tmp_path)
    assert main(["migrate", "--store", "sqlite:///live.db"]) == 0
    before = sorted(tmp_path.iterdir())
    assert main(["backup", "--store", "sqlite:///live.db", ""]) == 2
    assert capsys.readouterr().err == "order-gateway: FILE is empty: name the new copy's path\n"
    assert sorted(tmp_path.iterdir()) == before


def test_a_file_name_near_the_file_systems_limit_is_backed_up_to(tmp_path: Path) -> None:
    # FILE.<random>.partial-journal would be longer than the 255 bytes a name may have.
    live, copy = tmp_path / "live.db", tmp_path / ("n" * 249)
    assert main(["migrate", "--store", f"sqlite:///{live}"]) == 0
    assert main(["backup", "--store", f"sqlite:///{live}", str(copy)]) == 0
    assert verify_ok(copy)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("live.db")) == [
        copy.name
    ]


def verify_ok(path: Path) -> bool:
    return main(["verify", "--store", f"sqlite:///{path}"]) == 0


def store_of_5000_events(path: Path, random: bool = True) -> None:
    """``random``: ids and payloads of random bytes; else the same file every time, so
    that a given page holds the same records."""
    assert main(["migrate", "--store", f"sqlite:///{path}"]) == 0
    event_id, data = (
        ("hex(randomblob(16))", "randomblob(200)")
        if random
        else ("printf('%032d', i)", "zeroblob(200)")
    )
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)"
            " INSERT INTO events (event_id, stream_id, stream_version, occurred_at_us,"
            " command_id, correlation_id, user_id, event_type, data)"
            f" SELECT {event_id}, 'product-' || i, 1, 0, 'c' || i, '', '',"
            f" 'ProductRestocked', {data} FROM n"
        )


def damaged_store(path: Path) -> None:
    """A store of 5,000 events whose 51st page is overwritten, as a failing disk leaves it."""
    store_of_5000_events(path)
    page_size = 4096
    with path.open("r+b") as file:
        file.seek(page_size * 50)
        file.write(b"\xde\xad\xbe\xef" * 256)


def test_a_damaged_store_is_not_backed_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    damaged_store(live)
    assert main(["backup", "--store", f"sqlite:///{live}", str(copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"order-gateway: the store is damaged, so {copy} was not written: "
        "database disk image is malformed"
    )
    assert f"Run 'order-gateway verify --store sqlite:///{live}'" in err
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("live.db")) == []


def test_damage_is_named_by_its_first_problem_not_by_sqlites_heading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    store_of_5000_events(live, random=False)
    # Cell pointers of one table page overwritten: SQLite lists each bad cell under a
    # "*** in database main ***" heading, which is no problem of its own.
    with live.open("r+b") as file:
        file.seek(4096 * 49 + 12)
        file.write(b"\xff" * 8)
    assert main(["backup", "--store", f"sqlite:///{live}", str(copy)]) == 1
    assert main(["verify", "--store", f"sqlite:///{live}"]) == 1
    out, err = capsys.readouterr()
    assert err.startswith(
        f"order-gateway: the store is damaged, so {copy} was not written: On tree page 50 cell"
    ), err
    assert out.startswith("file: On tree page 50 cell"), out
    assert "***" not in out + err


@pytest.fixture
def read_only_directory(tmp_path: Path) -> Iterator[Path]:
    """A directory on a file system mounted read-only, as read-only media are."""
    media = tmp_path / "media"
    media.mkdir()
    mount = [
        "mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(media)
    ]  # fmt: skip
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only file system needs root")
    try:
        yield media
    finally:
        subprocess.run(["umount", str(media)], check=True)


def test_a_destination_on_a_read_only_file_system_is_named_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], read_only_directory: Path
) -> None:
    # Such a file system refuses to unlink even a name that is not there (EROFS, not
    # ENOENT): the clean-up of a copy never made must not hide why it was not made.
    live, copy = tmp_path / "live.db", read_only_directory / "copy.db"
    assert main(["migrate", "--store", f"sqlite:///{live}"]) == 0
    assert main(["backup", "--store", f"sqlite:///{live}", str(copy)]) == 1
    assert capsys.readouterr().err == (
        f"order-gateway: cannot create {copy}: unable to open database file\n"
    )


def wal_of_another_database(path: Path) -> None:
    """``path``-wal as a database deleted after a crash leaves it: whole commits that
    were never copied into the deleted file."""
    other = path.with_name("other.db")
    with closing(sqlite3.connect(other)) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA wal_autocheckpoint = 0")
        with connection:
            connection.execute("CREATE TABLE notes (body TEXT)")
            connection.executemany("INSERT INTO notes VALUES (?)", [("x" * 500,)] * 200)
        shutil.copyfile(other.with_name("other.db-wal"), path.with_name(f"{path.name}-wal"))
    for leftover in other.parent.glob("other.db*"):
        leftover.unlink()


def test_a_wal_left_by_a_deleted_database_is_not_applied_to_the_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    assert main(["migrate", "--store", f"sqlite:///{live}"]) == 0
    wal_of_another_database(copy)
    left = copy.with_name("copy.db-wal").read_bytes()
    assert main(["backup", "--store", f"sqlite:///{live}", str(copy)]) == 1
    assert capsys.readouterr().err == (
        f"order-gateway: cannot back up to {copy}: {copy}-wal is there, which SQLite would"
        " apply to the copy; remove it or choose another name\n"
    )
    assert not copy.exists()
    assert copy.with_name("copy.db-wal").read_bytes() == left


def test_the_empty_files_verify_leaves_beside_a_copy_do_not_stop_the_next_one(
    tmp_path: Path,
) -> None:
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    assert main(["migrate", "--store", f"sqlite:///{live}"]) == 0
    assert main(["backup", "--store", f"sqlite:///{live}", str(copy)]) == 0
    assert verify_ok(copy)
    copy.unlink()  # The -wal and -shm verify left stay, empty, as a rotation leaves them.
    assert main(["backup", "--store", f"sqlite:///{live}", str(copy)]) == 0
    assert verify_ok(copy)


@pytest.mark.parametrize("suffix", ["-journal", "-wal", "-shm"])
def test_a_copy_named_as_a_databases_own_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    # The next process to open the database would take the copy for its journal (and
    # delete it), or its -wal or -shm (and overwrite it).
    live = tmp_path / "live.db"
    assert main(["migrate", "--store", f"sqlite:///{live}"]) == 0
    for left in tmp_path.glob("live.db-*"):
        left.unlink()
    copy = tmp_path / f"live.db{suffix}"
    assert main(["backup", "--store", f"sqlite:///{live}", str(copy)]) == 1
    assert capsys.readouterr().err == (
        f"order-gateway: cannot back up to {copy}: SQLite would take it for {live}'s"
        f" {suffix[1:]} file; choose another name\n"
    )
    assert not copy.exists() or copy.stat().st_size == 0
    assert verify_ok(live)


def test_a_copy_cut_short_by_a_full_destination_leaves_nothing_beside_it(tmp_path: Path) -> None:
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    assert main(["migrate", "--store", f"sqlite:///{live}"]) == 0
    with closing(sqlite3.connect(live)) as connection, connection:
        connection.execute(
            "INSERT INTO events (event_id, stream_id, stream_version, occurred_at_us,"
            " command_id, correlation_id, user_id, event_type, data)"
            " VALUES ('e', 's', 1, 0, 'c', '', '', 'ProductRestocked', randomblob(2000000))"
        )
    # The destination's file system fills up (here: a file size limit) during the copy.
    limited = (
        "import resource, signal, sys\n"
        "from server.cli import main\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    refused = subprocess.run(
        [sys.executable, "-c", limited, "backup", "--store", f"sqlite:///{live}", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1, refused.stderr
    assert f"backup of {live} to {copy} failed" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("live.db")) == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://u:secret@db.invalid/orders", "pg_dump"),
        ("memory://", "SQLite stores only"),
        ("sqlite:///no/such/file.db", "no SQLite store"),
    ],
)
def test_what_cannot_be_copied_is_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, message: str
) -> None:
    assert main(["backup", "--store", url, str(tmp_path / "copy.db")]) == 1
    err = capsys.readouterr().err
    assert message in err and "secret" not in err
    # PostgreSQL's advice is for PostgreSQL only.
    assert ("pg_dump" in err) == url.startswith("postgresql:")
    assert list(tmp_path.iterdir()) == []


def test_a_store_url_of_no_store_this_gateway_has_is_a_usage_error_as_for_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "mysql://u:secret@db.invalid/orders"
    assert main(["verify", "--store", url]) == 2
    assert main(["backup", "--store", url, str(tmp_path / "copy.db")]) == 2
    err = capsys.readouterr().err
    assert "unsupported store URL 'mysql://u:***@db.invalid/orders'" in err
    assert "secret" not in err
    assert list(tmp_path.iterdir()) == []


def other_program_database(path: Path) -> None:
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("CREATE TABLE notes (body TEXT)")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(Path.touch, id="empty-file"),
        pytest.param(other_program_database, id="other-schema"),
        pytest.param(foreign_events_table, id="other-events-table"),
    ],
)
def test_a_sqlite_file_without_the_schema_is_refused_as_verify_refuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], None]
) -> None:
    source, copy = tmp_path / "other.db", tmp_path / "copy.db"
    make(source)
    assert main(["backup", "--store", f"sqlite:///{source}", str(copy)]) == 1
    assert f"no gateway schema in {source}" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == [source]


@pytest.mark.parametrize(
    ("make", "refusal"),
    [
        pytest.param(
            store_without_commands,
            "the file is marked schema version 6 (PRAGMA user_version) but lacks tables or"
            " columns that version has (commands): a damaged store",
            id="table-dropped",
        ),
        pytest.param(
            store_without_schema_versions,
            "the file is marked schema version 6 (PRAGMA user_version) but lacks tables or"
            " columns that version has (events.schema_version): a damaged store",
            id="column-dropped",
        ),
        pytest.param(
            versioned_foreign_database,
            "the file holds another program's tables",
            id="other-program-with-a-version",
        ),
    ],
)
def test_a_store_that_lost_a_table_is_refused_saying_what_it_lacks_as_verify_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], None], refusal: str
) -> None:
    # Was "no gateway schema in …", which did not say what was wrong with the store.
    source, copy = tmp_path / "marked.db", tmp_path / "copy.db"
    make(source)
    assert main(["verify", "--store", f"sqlite:///{source}"]) == 1
    verified = capsys.readouterr().err
    assert main(["backup", "--store", f"sqlite:///{source}", str(copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"order-gateway: cannot open the SQLite store {source}: {refusal}"), err
    assert err.removeprefix("order-gateway: ") == verified.removeprefix(
        "order-gateway: store error: "
    )
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("marked.db")) == []


def marked_later(path: Path, *statements: str) -> None:
    """``path`` marked with the schema version after this release's, as a later release
    leaves its store, after ``statements``."""
    with closing(sqlite3.connect(path)) as connection, connection:
        for statement in statements:
            connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {sqlite_schema.LATEST_VERSION + 1:d}")


@pytest.mark.parametrize(
    ("statements", "refusal"),
    [
        pytest.param(
            ["CREATE TABLE notes (body TEXT)"],
            "the file holds another program's tables (notes)",
            id="other-program",
        ),
        pytest.param(
            [*sqlite_schema.MIGRATIONS[0], "DROP TABLE commands"],
            "but lacks tables or columns that version has (commands, consumer_group_attempts,",
            id="not-this-release-s-tables",
        ),
    ],
)
def test_a_file_marked_with_a_later_version_is_refused_without_this_releases_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], statements: list[str], refusal: str
) -> None:
    # Migrations only add: a later release's store has every table of this one's. Was
    # copied, then failed "backup of … failed: no such table: events".
    source, copy = tmp_path / "later.db", tmp_path / "copy.db"
    marked_later(source, *statements)
    assert main(["backup", "--store", f"sqlite:///{source}", str(copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"order-gateway: cannot open the SQLite store {source}: "), err
    assert refusal in err
    assert not copy.exists()


def test_a_later_releases_store_is_copied_as_it_is(tmp_path: Path) -> None:
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    store_of_5000_events(live)
    marked_later(live, "CREATE TABLE of_a_later_release (id INTEGER PRIMARY KEY)")
    assert main(["backup", "--store", f"sqlite:///{live}", str(copy)]) == 0
    with closing(sqlite3.connect(copy)) as connection:
        assert connection.execute("SELECT count(*) FROM events").fetchone() == (5000,)
        assert connection.execute("SELECT count(*) FROM of_a_later_release").fetchone() == (0,)


def test_a_file_that_is_not_a_database_is_refused_with_the_message_verify_gives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Was "backup of … to … failed: file is not a database", as if the copy had failed.
    source, copy = tmp_path / "text.db", tmp_path / "copy.db"
    source.write_text("hello\n")
    assert main(["verify", "--store", f"sqlite:///{source}"]) == 1
    assert capsys.readouterr().err == (
        f"order-gateway: store error: cannot open the SQLite store {source}: file is not a"
        " database\n"
    )
    assert main(["backup", "--store", f"sqlite:///{source}", str(copy)]) == 1
    assert capsys.readouterr().err == (
        f"order-gateway: cannot open the SQLite store {source}: file is not a database\n"
    )
    assert sorted(tmp_path.iterdir()) == [source]


def test_a_store_cut_short_is_refused_as_damaged_with_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A copy that did not finish: its header counts pages the file no longer has. Was
    # "backup of … failed: database disk image is malformed", which did not say that
    # the store was damaged nor what to run.
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    store_of_5000_events(live)
    os.truncate(live, live.stat().st_size // 2)
    assert main(["backup", "--store", f"sqlite:///{live}", str(copy)]) == 1
    assert capsys.readouterr().err == (
        f"order-gateway: the store is damaged, so {copy} was not written: database disk"
        f" image is malformed. Run 'order-gateway verify --store sqlite:///{live}' for what"
        " is wrong\n"
    )
    assert sorted(tmp_path.iterdir()) == [live]


def postgres_binaries() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_dump"))
    return found[-1].parent if found else None


@pytest.fixture
def restore_url(postgres_url: str) -> Iterator[str]:
    with new_database(postgres_url, prefix="restore") as url:
        yield url


@pytest.mark.postgres
async def test_postgres_dump_and_restore_as_documented(
    fresh_postgres_url: str, restore_url: str, tmp_path: Path
) -> None:
    binaries = postgres_binaries() or (Path(p).parent if (p := shutil.which("pg_dump")) else None)
    if binaries is None:
        pytest.skip("no pg_dump")
    store = await PostgresEventStore.open(fresh_postgres_url)
    async with running_gateway(store) as gateway, connect(gateway) as clients:
        await run_writers(clients, 2, 5)
        original = await stored(store)

    dump = tmp_path / "orders.dump"
    for command in (
        [str(binaries / "pg_dump"), "--format=custom", f"--file={dump}", fresh_postgres_url],
        [str(binaries / "pg_restore"), "--no-owner", f"--dbname={restore_url}", str(dump)],
    ):
        process = await asyncio.create_subprocess_exec(
            *command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        output, _ = await process.communicate()
        assert process.returncode == 0, output.decode()

    restored = await PostgresEventStore.open(restore_url)
    try:
        report = await verify(restored)
        assert report.ok and report.events == len(original) == 22, report.lines()
        assert await stored(restored) == original
    finally:
        await restored.close()
