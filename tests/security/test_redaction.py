"""A store URL's credentials are never shown: not in logs, errors, help or settings dumps.

Three forms: ``user:password@`` in the URL, a ``password=`` (or ``sslpassword=``) query
parameter, and the ``PGPASSWORD`` variable libpq reads.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from server.cli import main
from server.config import Settings
from server.stores.urls import redacted_message, redacted_url
from tests.serving import free_port, gateway_log, start_gateway, wait_until_serving

SECRET = "s3cret-Passw0rd"
OTHER_SECRET = "0ther-Passw0rd"

pytestmark = pytest.mark.usefixtures("keep_root_logger")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # An unencoded "/" or "@" in the password: masked whole, not up to the character.
        ("postgresql://gw:pa/ss@db/orders", "postgresql://gw:***@db/orders"),
        ("postgresql://gw:p@ss@db/orders", "postgresql://gw:***@db/orders"),
        ("postgresql://gw:p%40ss@db/orders#x", "postgresql://gw:***@db/orders#x"),
        ("postgresql://gw:pa?ss@db/orders", "postgresql://gw:***@db/orders"),
        ("postgresql://gw:pa#ss@db/orders", "postgresql://gw:***@db/orders"),
        ("postgresql://gw:p?a/s@s@db/orders", "postgresql://gw:***@db/orders"),
        ("postgresql://gw:p@ss/w@db:5432/orders", "postgresql://gw:***@db:5432/orders"),
        ("postgresql://gw:p@ss?w@db/orders", "postgresql://gw:***@db/orders"),
        (
            "postgresql://gw:pa/ss@db/orders?application_name=a@b",
            "postgresql://gw:***@db/orders?application_name=a@b",
        ),
        # An "@" in the query does not end the user part.
        (
            "postgresql://gw:pass@db/orders?application_name=a@b",
            "postgresql://gw:***@db/orders?application_name=a@b",
        ),
        # Malformed URLs are reported too, so redacting one must not fail.
        ("postgresql://gw:s3cret@[::1/orders", "postgresql://gw:***@[::1/orders"),
        (
            "postgresql://gw@db/orders?password=a b&x=1",
            "postgresql://gw@db/orders?password=***&x=1",
        ),
        ("sqlite:////data/a:b@c.db", "sqlite:////data/a:b@c.db"),
        ("memory://", "memory://"),
        # Mistyped, not URLs at all: what looks like a password before the last "@".
        ("postgresql:/gw:pa55@db:5432/orders", "postgresql:/gw:***@db:5432/orders"),
        ("postgresql//gw:pa55@db/orders", "postgresql//gw:***@db/orders"),
        ("postgres:gw:pa55@db/orders", "postgres:gw:***@db/orders"),
        ("postgresql:///gw:pa55@db/orders", "postgresql:///gw:***@db/orders"),
        ("postgres:gw:p@ss@db/orders", "postgres:gw:***@db/orders"),
        ("gw:pa55@db/orders", "gw:***@db/orders"),  # no scheme at all
        ("host=db user=a@b password=pa55", "host=db user=a@b password=***"),
        # libpq knows no PASSWORD=, and quotes the URL in its complaint.
        ("postgresql://gw@db/orders?PASSWORD=pa55", "postgresql://gw@db/orders?PASSWORD=***"),
    ],
)
def test_every_credential_form_is_masked(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://gw:p%zz{SECRET}@db/orders",  # an invalid percent-encoding
        f"postgresql://gw:{SECRET} x@db/orders",  # a space
        f"postgresql://gw:{SECRET}@[::1/orders",  # the whole URL quoted
        f"postgresql://gw@db/orders?password={SECRET}&bogus=1",
    ],
)
def test_a_driver_message_quoting_the_password_is_masked(url: str) -> None:
    with pytest.raises(psycopg.ProgrammingError) as raised:
        conninfo_to_dict(url)
    message = str(raised.value)
    if "bogus" not in message:
        assert SECRET in message  # libpq does quote it
    assert SECRET not in redacted_message(message, url)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql:/gw:{SECRET}@db/orders",
        f"postgresql//gw:{SECRET}@db/orders",
        f"postgres:gw:{SECRET}@db/orders",
        f"postgresql:///gw:{SECRET}@db/orders",
        f"gw:{SECRET}@db/orders",
    ],
)
@pytest.mark.parametrize("command", ["serve", "migrate", "verify", "backup"])
def test_a_mistyped_store_url_is_refused_without_its_password(
    url: str, command: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    arguments = [command, "--store", url]
    if command == "backup":
        arguments.append(str(tmp_path / "copy.db"))
    assert main(arguments) != 0
    error = capsys.readouterr().err
    assert error.startswith("order-gateway: ")
    assert SECRET not in error


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://gw:p%zz{SECRET}@db/orders",
        f"postgresql://gw:{SECRET} x@db/orders",
        f"postgresql://gw:{SECRET}@[::1/orders",
        f"postgresql://gw:{SECRET}@db:abc/orders",
        f"postgresql://gw:{SECRET}@db:99999/orders",
        f"postgresql://gw:{SECRET}@db1:5432,db2:0/orders",
        f"postgresql://gw:{SECRET}@db/orders?port=5432x",
        # Values psycopg checks before it connects.
        f"postgresql://gw:{SECRET}@db/orders?connect_timeout=abc",
        # Values libpq checks before it connects (nothing listens on port 1).
        f"postgresql://gw:{SECRET}@127.0.0.1:1/orders?sslmode=bogus",
        f"postgresql://gw:{SECRET}@127.0.0.1:1/orders?channel_binding=x",
        f"postgresql://gw:{SECRET}@127.0.0.1:1/orders?keepalives=abc",
        # Unencoded in the password, these would end it early for libpq or a parser.
        f"postgresql://gw:{SECRET}/x@db/orders",
        f"postgresql://gw:{SECRET}?x@db/orders",
        f"postgresql://gw:{SECRET}#x@db/orders",
        f"postgresql://gw:p@{SECRET}@db/orders",
        f"postgresql://gw:{SECRET}@x@db/orders",
        f"postgresql://gw:x@{SECRET}/y@db/orders",
        f"postgresql://gw:x@db/orders?PASSWORD={SECRET}",
    ],
)
@pytest.mark.parametrize("command", ["migrate", "verify"])
def test_a_malformed_postgres_url_is_a_configuration_error_without_the_password(
    url: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--store", url]) == 2
    error = capsys.readouterr().err
    assert "invalid PostgreSQL store URL 'postgresql://gw:***@" in error
    assert SECRET not in error


def test_settings_show_the_store_url_masked() -> None:
    settings = Settings(store=f"postgresql://gw:{SECRET}@db/orders?password={OTHER_SECRET}")
    for dump in (repr(settings), str(settings), f"{settings!r}"):
        assert "store='postgresql://gw:***@db/orders?password=***'" in dump
        assert SECRET not in dump
        assert OTHER_SECRET not in dump


def test_help_does_not_show_the_store_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ORDER_GATEWAY_STORE", f"postgresql://gw:{SECRET}@db/orders")
    monkeypatch.setenv("PGPASSWORD", OTHER_SECRET)
    for command in (["--help"], ["serve", "--help"], ["migrate", "--help"]):
        with pytest.raises(SystemExit):
            main(command)
        output = capsys.readouterr()
        assert SECRET not in output.out + output.err
        assert OTHER_SECRET not in output.out + output.err


def test_pgpassword_is_not_echoed_when_the_server_cannot_be_reached(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PGPASSWORD", SECRET)
    url = f"postgresql://gw@127.0.0.1:{free_port()}/orders?password={OTHER_SECRET}"
    assert main(["migrate", "--store", url]) == 1
    error = capsys.readouterr().err
    assert "PostgreSQL is unavailable" in error
    assert SECRET not in error
    assert OTHER_SECRET not in error


@pytest.mark.postgres
async def test_the_log_shows_the_store_url_masked_in_every_form(postgres_url: str) -> None:
    # The test server trusts every connection, so a URL carrying passwords still works.
    host_part = postgres_url.partition("://")[2].partition("@")[2]
    url = f"postgresql://postgres:{SECRET}@{host_part}?password={OTHER_SECRET}"
    target = f"127.0.0.1:{free_port()}"
    process = start_gateway(
        ["serve", "--listen", target, "--store", url, "--log-level", "DEBUG"],
        env={**os.environ, "PGPASSWORD": "pgpassw0rd-from-env"},
    )
    try:
        await wait_until_serving(target, process)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)
    log = gateway_log(process)
    assert f"(store postgresql://postgres:***@{host_part}?password=***, event loop" in log
    for secret in (SECRET, OTHER_SECRET, "pgpassw0rd-from-env"):
        assert secret not in log
