"""The order-gateway command as operators use it: flags, variables, serve, signals."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from orders.v1 import inventory_command_service_pb2_grpc
from orders.v1.inventory_command_service_pb2 import RestockProductRequest
from pydantic import ValidationError

from domain.errors import StoreError
from server import app
from server.app import create_server
from server.cli import build_parser, main, settings_from
from server.config import Settings
from tests.postgres_databases import new_role
from tests.serving import (
    free_port,
    gateway_log,
    listening_stranger,
    signal_until_exit,
    start_gateway,
    wait_until_serving,
)
from tests.workers_support import env_without_settings


def test_a_flag_wins_over_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDER_GATEWAY_LISTEN", "127.0.0.1:7000")
    monkeypatch.setenv("ORDER_GATEWAY_STORE", "memory://")
    args = build_parser().parse_args(["serve", "--listen", "127.0.0.1:7001"])
    settings = settings_from(args)
    assert (settings.listen, settings.store) == ("127.0.0.1:7001", "memory://")


def test_the_log_format_is_taken_in_any_case_as_the_log_level_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ORDER_GATEWAY_LOG_FORMAT", "JSON")
    assert settings_from(build_parser().parse_args(["serve"])).log_format == "json"
    args = build_parser().parse_args(["serve", "--log-format", "Text"])
    assert settings_from(args).log_format == "text"


def test_defaults_follow_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ORDER_GATEWAY_LISTEN", "ORDER_GATEWAY_STORE"):
        monkeypatch.delenv(name, raising=False)
    settings = settings_from(build_parser().parse_args(["serve"]))
    assert (settings.listen, settings.store) == ("127.0.0.1:50051", "sqlite:///order-gateway.db")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_serve_stops_gracefully_on_a_signal(signum: signal.Signals) -> None:
    # SIGHUP: the terminal that started it closed.
    target = f"127.0.0.1:{free_port()}"
    process = start_gateway(["serve", "--listen", target, "--store", "memory://"], hangup="default")
    try:
        await wait_until_serving(target, process)
        async with grpc.aio.insecure_channel(target) as channel:
            inventory = inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel)
            call = inventory.RestockProduct(RestockProductRequest(product_id="a", quantity=1))
            assert [r.event.position async for r in call] == [1]
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest())
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            process.send_signal(signum)
            started = time.monotonic()
            statuses = []
            try:
                while (reply := await watch.read()) is not grpc.aio.EOF:
                    statuses.append(reply.status)
            except grpc.aio.AioRpcError:
                pass
        code = await asyncio.to_thread(process.wait, 10)
        assert code == 0
        assert time.monotonic() - started < 10
        assert statuses[:1] == [health_pb2.HealthCheckResponse.NOT_SERVING]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_serve_started_with_sighup_ignored_keeps_serving_on_a_hangup() -> None:
    # As under nohup: the terminal closing must not stop it.
    target = f"127.0.0.1:{free_port()}"
    process = start_gateway(["serve", "--listen", target, "--store", "memory://"], hangup="ignored")
    try:
        await wait_until_serving(target, process)
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(1)
        assert process.poll() is None, gateway_log(process)
        await wait_until_serving(target, process)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_signals_repeated_while_the_gateway_stops_change_nothing() -> None:
    """An operator (or an orchestrator) sending SIGTERM again and again while the gateway
    stops: it still ends as a stop does, with status 0, whenever the next one lands."""
    target = f"127.0.0.1:{free_port()}"
    process = start_gateway(["serve", "--listen", target, "--store", "memory://"])
    try:
        await wait_until_serving(target, process)
        await asyncio.to_thread(signal_until_exit, process)
        assert process.returncode == 0, gateway_log(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_a_stop_is_bounded_while_a_command_waits_for_the_store(tmp_path: Path) -> None:
    # Another process holds SQLite's write lock: a command waits for it (up to 30 s) in a
    # thread the grace period cannot cut short. The stop must still end within 10 s.
    target = f"127.0.0.1:{free_port()}"
    store = tmp_path / "locked.db"
    process = start_gateway(["serve", "--listen", target, "--store", f"sqlite:///{store}"])
    try:
        await wait_until_serving(target, process)
        with closing(sqlite3.connect(store, timeout=0)) as holder:
            holder.execute("BEGIN EXCLUSIVE")
            async with grpc.aio.insecure_channel(target) as channel:
                inventory = inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel)
                call = inventory.RestockProduct(RestockProductRequest(product_id="a", quantity=1))
                await asyncio.sleep(1)  # the command now waits for the lock
                process.send_signal(signal.SIGTERM)
                started = time.monotonic()
                code = await asyncio.to_thread(process.wait, 15)
                stopped_after = time.monotonic() - started
                call.cancel()
            holder.rollback()
        assert code == 0, gateway_log(process)
        assert stopped_after < 10
        assert "did not stop within" in gateway_log(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_a_stop_cut_short_at_its_bound_logs_the_calls_it_leaves_unanswered(
    tmp_path: Path,
) -> None:
    # A grace period the bound (9 s) cuts short: the command waiting for SQLite's write
    # lock, which another process holds, is still in flight when the process exits.
    target = f"127.0.0.1:{free_port()}"
    store = tmp_path / "locked.db"
    process = start_gateway(
        ["serve", "--listen", target, "--store", f"sqlite:///{store}"],
        env={**os.environ, "ORDER_GATEWAY_SHUTDOWN_GRACE": "9"},
    )
    try:
        await wait_until_serving(target, process)
        with closing(sqlite3.connect(store, timeout=0)) as holder:
            holder.execute("BEGIN EXCLUSIVE")
            async with grpc.aio.insecure_channel(target) as channel:
                inventory = inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel)
                request = RestockProductRequest(product_id="a", quantity=1)
                call = inventory.RestockProduct(request, metadata=(("x-request-id", "cut-1"),))
                await asyncio.sleep(1)  # the command now waits for the lock
                process.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(process.wait, 15)
                call.cancel()
            holder.rollback()
        logged = gateway_log(process)
        assert code == 0, logged
        assert "did not stop within 9 s" in logged
        (line,) = [line for line in logged.splitlines() if "request_id=cut-1" in line]
        assert "/orders.v1.InventoryCommandService/RestockProduct CANCELLED" in line
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_a_second_gateway_on_a_taken_address_is_refused(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    first = start_gateway(["serve", "--listen", target, "--store", "memory://"])
    try:
        await wait_until_serving(target, first)
        second = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--listen",
                target,
                "--store",
                f"sqlite:///{tmp_path / 'second.db'}",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert second.returncode == 1
        assert target in second.stderr
        assert "Traceback" not in second.stderr
        # The first one still answers every call.
        assert first.poll() is None
        await wait_until_serving(target, first)
    finally:
        first.send_signal(signal.SIGTERM)
        await asyncio.to_thread(first.wait, 10)


@pytest.mark.parametrize(
    "address", ["127.0.0.1:0", "[::1]:50051", "localhost:65535", "0.0.0.0:0", "[::]:0"]
)
def test_listen_takes_host_and_port(address: str) -> None:
    assert Settings(listen=address, metrics_listen=address).listen == address


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:99999",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1",
        "50051",
        "host:http",
        "127.0.0.1:5\u0665",  # an Arabic-Indic digit
    ],
)
def test_a_listen_address_without_a_valid_port_is_refused(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # grpc would take 99999 modulo 65536 and listen on 34463 without a word.
    assert main(["serve", "--listen", address, "--store", "memory://"]) == 2
    assert capsys.readouterr().err == (
        "order-gateway: listen: not HOST:PORT with a port from 0 to 65535\n"
    )
    with pytest.raises(ValidationError, match="metrics_listen"):
        Settings(metrics_listen=address)


@pytest.mark.parametrize("address", ["::1:50051", "[::1:50051", "::1]:50051", "fe80::1:0"])
def test_an_ipv6_address_without_brackets_is_refused(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--listen", address, "--store", "memory://"]) == 2
    assert capsys.readouterr().err == (
        "order-gateway: listen: an IPv6 address goes in brackets: [ADDRESS]:PORT\n"
    )
    with pytest.raises(ValidationError, match="metrics_listen"):
        Settings(metrics_listen=address)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        (":50051", "no host"),
        ("[]:50051", "no host"),
        ("[127.0.0.1]:50051", "only an IPv6 address goes in brackets"),
        ("[localhost]:50051", "only an IPv6 address goes in brackets"),
    ],
)
@pytest.mark.parametrize("setting", ["listen", "metrics_listen"])
def test_an_address_without_a_host_or_with_ipv4_in_brackets_is_refused(
    address: str, problem: str, setting: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # grpc refused these only as it bound, after a log line of its own, while --workers
    # and the metrics server served ":50051" on every interface.
    flag = "--" + setting.replace("_", "-")
    argv = ["serve", "--listen", "127.0.0.1:0", flag, address, "--store", "memory://"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"order-gateway: {setting}: {problem}")
    assert err.count("\n") == 1
    assert "HOST:PORT or [IPv6]:PORT" in err


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "soon", "1e10"])
def test_a_health_timeout_that_is_no_time_to_wait_is_a_usage_error(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["health", "--target", "127.0.0.1:9", "--timeout", timeout])
    assert exited.value.code == 2
    assert "argument --timeout: " in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["health"],
        ["tail"],
        ["consume", "--group", "g"],
        ["group", "list"],
    ],
)
def test_a_target_port_past_65535_is_a_usage_error(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # grpc calls such a port modulo 65536: health answered SERVING for 127.0.0.1:115587,
    # from whatever served on port 50051.
    with pytest.raises(SystemExit) as exited:
        main([*command, "--target", "127.0.0.1:115587"])
    assert exited.value.code == 2
    assert "argument --target: the port must be from 0 to 65535" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["health"], ["tail"], ["consume", "--group", "g"]])
@pytest.mark.parametrize("target", ["", "127.0.0.1", "[::1]", "127.0.0.1:", ":50051", "host:http"])
def test_a_target_without_a_host_or_port_is_a_usage_error(
    command: list[str],
    target: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # grpc called port 443 of a target without a port, and failed an empty one only as
    # it connected, after log lines of its own.
    with pytest.raises(SystemExit) as exited:
        main([*command, "--target", target])
    assert exited.value.code == 2
    assert f"argument --target: not HOST:PORT or [IPv6]:PORT: {target!r}" in (
        capsys.readouterr().err
    )
    monkeypatch.setenv("ORDER_GATEWAY_TARGET", target)
    with pytest.raises(SystemExit) as exited:
        main(command)
    assert exited.value.code == 2
    assert "argument --target (ORDER_GATEWAY_TARGET): not HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--list", "127.0.0.1:0", "--store", "memory://"],
        ["serve", "--listen", "127.0.0.1:0", "--insec"],
        ["migrate", "--sto", "memory://"],
        ["health", "--targ", "127.0.0.1:9"],
        ["tail", "--target", "127.0.0.1:9", "--aft", "1"],
        ["group", "list", "--target", "127.0.0.1:9", "--time", "1"],
    ],
)
def test_an_abbreviated_option_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # A prefix unique today would change meaning once an option sharing it is added.
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "unrecognized arguments: " in capsys.readouterr().err


def test_an_unknown_log_level_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert Settings(log_level="warning").log_level == "warning"
    assert main(["serve", "--log-level", "LOUD", "--store", "memory://"]) == 2
    assert capsys.readouterr().err == (
        "order-gateway: log_level: not one of DEBUG, INFO, WARNING, ERROR\n"
    )


@pytest.mark.parametrize(
    ("flags", "option"),
    [
        (["--jwt-public-key", "{missing}"], "--jwt-public-key (ORDER_GATEWAY_JWT_PUBLIC_KEY)"),
        (["--auth-tokens", "{missing}"], "--auth-tokens (ORDER_GATEWAY_AUTH_TOKENS)"),
        (["--tls-cert", "{missing}", "--tls-key", "{key}"], "--tls-cert (ORDER_GATEWAY_TLS_CERT)"),
        (["--tls-cert", "{cert}", "--tls-key", "{missing}"], "--tls-key (ORDER_GATEWAY_TLS_KEY)"),
    ],
)
@pytest.mark.usefixtures("keep_root_logger")
def test_a_file_that_cannot_be_read_is_refused_naming_its_setting(
    flags: list[str], option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.pem"
    (tmp_path / "cert.pem").write_text("not read: the other file is missing first\n")
    paths = {"missing": missing, "key": tmp_path / "cert.pem", "cert": tmp_path / "cert.pem"}
    args = [flag.format(**paths) for flag in flags]
    assert main(["serve", "--listen", "127.0.0.1:0", "--store", "memory://", *args]) == 2
    assert capsys.readouterr().err == (
        f"order-gateway: {option} {missing}: No such file or directory\n"
    )


@pytest.mark.usefixtures("keep_root_logger")
def test_a_file_named_by_a_variable_is_refused_naming_the_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "tokens.toml"
    monkeypatch.setenv("ORDER_GATEWAY_AUTH_TOKENS", str(missing))
    assert main(["serve", "--listen", "127.0.0.1:0", "--store", "memory://"]) == 2
    assert "ORDER_GATEWAY_AUTH_TOKENS" in capsys.readouterr().err


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    # argparse keeps sub-commands only in this attribute.
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", sorted(command_parsers()))
def test_every_option_of_every_command_is_described_in_its_help(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = command_parsers()[command]
    shown = help_of([command, "--help"], capsys)
    assert parser.description and " ".join(parser.description.split()) in shown
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    # A command with actions of its own (group create, group list, …): each action's help.
    actions: dict[tuple[str, ...], argparse.ArgumentParser] = {
        (command, name): action for sub in nested for name, action in sub.choices.items()
    } or {(command,): parser}
    for argv, each in actions.items():
        shown = help_of([*argv, "--help"], capsys)
        options = [a for a in each._actions if a.option_strings and a.dest != "help"]
        assert options, argv
        for option in options:
            assert option.help and option.help != argparse.SUPPRESS, option.option_strings
            described = " ".join(option.help.replace("%(default)s", str(option.default)).split())
            assert described.replace("%%", "%") in shown, option.option_strings


def test_tail_help_says_what_each_option_does(capsys: pytest.CaptureFixture[str]) -> None:
    shown = help_of(["tail", "--help"], capsys)
    assert (
        "--target HOST:PORT the gateway to follow (default: the address of"
        " ORDER_GATEWAY_LISTEN, a wildcard host read as loopback, or 127.0.0.1:50051)" in shown
    )
    assert "--after N print only events at positions after N" in shown
    assert "--type NAME print only events of this type, e.g. OrderCreated" in shown


def test_serve_help_names_each_option_s_variable_and_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    shown = help_of(["serve", "--help"], capsys)
    assert "[ORDER_GATEWAY_LISTEN, default 127.0.0.1:50051]" in shown
    assert "--auth-tokens FILE TOML file of bearer tokens" in shown
    assert "[ORDER_GATEWAY_INSECURE]" in shown


def test_a_store_serve_cannot_open_exits_1_with_the_stores_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A directory where the SQLite file should be (as docs/operations.md's table says).
    assert main(["serve", "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path}"]) == 1
    assert f"store error: cannot open the SQLite store {tmp_path}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "refusal"),
    [
        ("migrate", "store error: cannot open the SQLite store {}: it is a FIFO, not a file"),
        ("verify", "no SQLite store at {}"),
        ("backup", "no SQLite store at {}"),
    ],
)
def test_a_fifo_named_as_the_store_is_refused_without_waiting_on_it(
    tmp_path: Path, command: str, refusal: str
) -> None:
    # Opening a FIFO to write blocks until a reader comes: migrate and serve (which
    # opens its store the same way) waited forever, on the event loop, deaf to SIGTERM.
    fifo = tmp_path / "fifo.db"
    os.mkfifo(fifo)
    args = ["backup", str(tmp_path / "copy.db")] if command == "backup" else [command]
    refused = subprocess.run(
        [sys.executable, "-m", "server.cli", *args[:1], "--store", f"sqlite:///{fifo}", *args[1:]],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 1
    assert refused.stderr == f"order-gateway: {refusal.format(fifo)}\n"
    assert files_in(tmp_path) == ["fifo.db"]


def test_a_postgresql_store_serve_may_not_write_exits_1_naming_the_grant(
    fresh_postgres_url: str,
) -> None:
    """Served, every command would fail INTERNAL; SQLite refuses a file it cannot write."""
    assert main(["migrate", "--store", fresh_postgres_url]) == 0
    with new_role(fresh_postgres_url, "SELECT ON ALL TABLES IN SCHEMA public") as as_role:
        role = as_role.partition("://")[2].partition("@")[0]
        status, lines = refused_start("--listen", "127.0.0.1:0", "--store", as_role)
    assert status == 1
    assert len(lines) == 1
    assert lines[0].startswith(
        f"order-gateway: store error: the role {role} may not insert into events, commands,"
    )
    assert lines[0].endswith("; see docs/operations.md, Privileges")


@pytest.mark.parametrize("command", ["serve", "migrate", "verify", "backup"])
@pytest.mark.parametrize("suffix", ["?mode=ro", "#main"])
def test_a_sqlite_url_with_a_query_or_fragment_is_refused_and_no_file_made(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    suffix: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///events.db{suffix}"
    args = {"serve": ["--listen", "127.0.0.1:0"], "backup": ["copy.db"]}.get(command, [])
    assert main([command, "--store", url, *args]) == 2
    assert capsys.readouterr().err == (
        f"order-gateway: invalid SQLite store URL '{url}': it names a file,"
        " with no query (?…) or fragment (#…)\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["migrate", "verify", "backup"])
@pytest.mark.parametrize("name", ["store/", "store/.", "store/..", "."])
def test_a_sqlite_url_naming_a_directory_is_refused_and_no_file_made(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    name: str,
) -> None:
    # "store/" made a file named store (with its -wal and -shm), as Path() drops the "/".
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{name}"
    args = ["copy.db"] if command == "backup" else []
    assert main([command, "--store", url, *args]) == 2
    assert capsys.readouterr().err == (
        f"order-gateway: invalid SQLite store URL '{url}': it names a directory, not a file\n"
    )
    assert list(tmp_path.iterdir()) == []


def files_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def refused_start(*args: str) -> tuple[int, list[str]]:
    """``order-gateway serve <args>`` that must exit at once: its status and its lines
    of its own on stderr (grpc's native log may add some of its own)."""
    refused = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "Traceback" not in refused.stderr, refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.startswith("order-gateway:")]
    return refused.returncode, lines


def test_the_grpc_address_as_metrics_address_is_refused_before_the_store_is_created(
    tmp_path: Path,
) -> None:
    address = f"127.0.0.1:{free_port()}"
    code, lines = refused_start(
        "--listen",
        address,
        "--metrics-listen",
        address,
        "--store",
        f"sqlite:///{tmp_path / 'new.db'}",
    )
    assert code == 2
    assert lines == [f"order-gateway: cannot serve metrics on {address}: Address already in use"]
    # A refused start leaves nothing behind: no database, -wal or -shm file.
    assert files_in(tmp_path) == []


UNBINDABLE_HOST = "192.0.2.1"
"""TEST-NET-1 (RFC 5737): documentation only, on no interface of this host."""


@pytest.mark.parametrize("port", ["0", "free"])
def test_an_address_grpc_cannot_bind_is_refused_before_the_store_is_created(
    port: str, tmp_path: Path
) -> None:
    # Refused with the reason, before grpc tries it (which would log a line of its own
    # and give only a hint to turn its debug output on).
    address = f"{UNBINDABLE_HOST}:{free_port() if port == 'free' else 0}"
    with socket.socket() as probe:
        try:
            probe.bind((UNBINDABLE_HOST, 0))
        except OSError:
            pass
        else:
            pytest.skip(f"{UNBINDABLE_HOST} is an address of this host")
    store = f"sqlite:///{tmp_path / 'new.db'}"
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--listen",
            address,
            "--insecure",
            "--store",
            store,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 1
    # The one line, grpc's own log included.
    assert refused.stderr.splitlines() == [
        f"order-gateway: Failed to bind to address {address}: Cannot assign requested address"
    ]
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(
    ("workers", "code", "message"),
    [("1", 1, "Failed to bind to address"), ("2", 2, "cannot listen on")],
)
def test_a_host_that_does_not_resolve_is_refused_naming_the_address(
    tmp_path: Path, workers: str, code: int, message: str
) -> None:
    # The resolver's own errno (-2) is no OS error number: os.strerror() of it said
    # "Unknown error -2"; with --workers the message named no address.
    address = f"nohost.invalid:{free_port()}"
    store = f"sqlite:///{tmp_path / 'new.db'}"
    status, lines = refused_start(
        "--listen", address, "--insecure", "--workers", workers, "--store", store
    )
    assert status == code
    assert len(lines) == 1
    assert lines[0].startswith(f"order-gateway: {message} {address}: ")
    assert "Unknown error" not in lines[0]
    assert files_in(tmp_path) == []


FATAL_ERRORS = {
    "sqlite store": (
        ["--store", "sqlite:////nonexistent/dir/x.db"],
        {"1": 1, "2": 1},
        "store error: cannot open the SQLite store /nonexistent/dir/x.db: unable to open",
    ),
    "postgresql store": (
        ["--store", "postgresql://gateway@127.0.0.1:{closed}/orders"],
        {"1": 1, "2": 1},
        "store error: PostgreSQL is unavailable",
    ),
    "listen": (
        ["--listen", "{taken}"],
        {"1": 1, "2": 2},
        "{bind} {taken}: another process listens there",
    ),
    "metrics listen": (
        ["--metrics-listen", "{taken}"],
        {"1": 2, "2": 2},
        "cannot serve metrics on {taken}: Address already in use",
    ),
}
"""What each failed start is given, its exit status by --workers, and the start of its
error message ({bind}: the gateway's words for an address it cannot take)."""


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("failure", list(FATAL_ERRORS))
def test_a_failed_start_with_json_logs_is_one_json_error_line(
    tmp_path: Path, failure: str, workers: str
) -> None:
    given, codes, message = FATAL_ERRORS[failure]
    with listening_stranger() as taken:
        names = {
            "taken": taken,
            "closed": str(free_port()),
            "bind": "Failed to bind to address" if workers == "1" else "cannot listen on",
        }
        args = [
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--store",
            f"sqlite:///{tmp_path / 'new.db'}",
            "--log-format",
            "json",
            "--workers",
            workers,
            # Given last: each wins over the same flag above.
            *(arg.format(**names) for arg in given),
        ]
        refused = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=env_without_settings(),
        )
    assert refused.returncode == codes[workers]
    # Every line JSON, as --log-format json promises, the last one the error.
    lines = [json.loads(line) for line in refused.stderr.splitlines()]
    error = lines[-1]
    assert (error["level"], error["logger"]) == (
        "ERROR",
        "order_gateway.server" if workers == "1" else "order_gateway.workers",
    )
    assert error["message"].startswith(message.format(**names)), error


async def test_a_start_refused_once_bound_releases_the_port_and_closes_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    store = f"sqlite:///{tmp_path / 'new.db'}"
    both = Settings(listen=f"127.0.0.1:{port}", metrics_listen=f"127.0.0.1:{port}", store=store)
    with pytest.raises(OSError, match="cannot serve metrics on"):
        await create_server(both)
    assert files_in(tmp_path) == []

    async def unreadable(events: object) -> None:
        raise StoreError("no consumer groups")

    monkeypatch.setattr(app, "open_group_store", unreadable)
    # The same port again: the check for a listening stranger would refuse one still bound.
    with pytest.raises(StoreError, match="no consumer groups"):
        await create_server(Settings(listen=f"127.0.0.1:{port}", store=store))
    # Closed: SQLite deletes the -wal and -shm files with its last connection.
    assert files_in(tmp_path) == ["new.db"]
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    "variable", ["ORDER_GATEWAY_MAX_REQUEST_BYTES", "ORDER_GATEWAY_MAX_CONCURRENT_STREAMS"]
)
def test_a_grpc_setting_too_large_for_grpc_is_refused_before_the_store_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, "3000000000")
    code, lines = refused_start("--listen", "127.0.0.1:0", "--store", "sqlite:///events.db")
    assert code == 2
    setting = variable.removeprefix("ORDER_GATEWAY_").lower()
    assert any(setting in line and "2147483647" in line for line in lines), lines
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(
    "setting", ["auth_tokens", "jwt_public_key", "tls_cert", "tls_key", "tls_client_ca"]
)
def test_a_file_setting_set_empty_is_refused_by_its_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], setting: str
) -> None:
    # As a manifest's `value: ""` sets it: not the working directory, read as a file.
    monkeypatch.setenv(f"ORDER_GATEWAY_{setting.upper()}", "")
    assert main(["serve", "--listen", "127.0.0.1:0", "--store", "memory://"]) == 2
    assert f"{setting}: empty: name a file, or leave the setting unset" in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["jwt_issuer", "jwt_audience"])
@pytest.mark.parametrize("value", ["", " "], ids=["empty", "blank"])
def test_a_jwt_claim_setting_set_empty_is_refused_not_left_unchecked(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    setting: str,
    value: str,
) -> None:
    # A template expanding an unset variable: every issuer (or audience) would pass. A
    # store in a missing folder fails the start (exit 1) if the setting gets through.
    serve = ["serve", "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path}/no/events.db"]
    monkeypatch.setenv(f"ORDER_GATEWAY_{setting.upper()}", value)
    assert main(serve) == 2
    assert f"{setting}: empty: name the value the claim must have" in capsys.readouterr().err
    monkeypatch.delenv(f"ORDER_GATEWAY_{setting.upper()}")
    assert main([*serve, "--" + setting.replace("_", "-"), value]) == 2


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("store", "sqlite:///events.db "),
        ("store", " sqlite:///events.db"),
        ("listen", " 127.0.0.1:0"),
        ("metrics_listen", "127.0.0.1:0\n"),
        ("jwt_issuer", "https://idp "),
        ("jwt_audience", "\torders"),
    ],
)
def test_a_setting_with_white_space_around_it_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    setting: str,
    value: str,
) -> None:
    # Taken as it is, a store URL would name another file ("events.db "), a new and empty
    # store; a claim would match no token's, every call refused.
    monkeypatch.chdir(tmp_path)
    key = tmp_path / "key.pem"
    key.write_text("unread: the settings are refused first")
    serve = ["serve", "--jwt-public-key", str(key)]
    if setting != "listen":
        serve += ["--listen", "127.0.0.1:0"]  # else the flag would win over the variable
    monkeypatch.setenv(f"ORDER_GATEWAY_{setting.upper()}", value)
    assert main(serve) == 2
    assert capsys.readouterr().err == (
        f"order-gateway: {setting}: white space before or after the value: remove it\n"
    )
    monkeypatch.delenv(f"ORDER_GATEWAY_{setting.upper()}")
    assert main([*serve, "--" + setting.replace("_", "-"), value]) == 2
    assert files_in(tmp_path) == ["key.pem"]


@pytest.mark.parametrize("command", ["migrate", "verify"])
def test_a_store_url_with_white_space_around_it_is_refused_by_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    argv = [command, "--store", f"sqlite:///{tmp_path / 'events.db'} "]
    assert main(argv) == 2
    assert "store: white space before or after the value" in capsys.readouterr().err
    assert main(["backup", "--store", " memory://", str(tmp_path / "copy.db")]) == 2
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["group", "create", "billing", "--partitions", "1_6"],
        ["group", "create", "billing", "--max-deliveries", "٣"],
        ["group", "replay-parked", "billing", "--limit", "+5"],
        ["group", "list", "--timeout", "1_0"],
        ["group", "create", "billing", "--ack-timeout", "٣٠"],
        ["health", "--timeout", "٣"],
    ],
)
def test_a_number_not_written_in_ascii_digits_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert f"argument {argv[-2]}: not a " in capsys.readouterr().err


def test_the_command_summary_names_every_group_action(capsys: pytest.CaptureFixture[str]) -> None:
    shown = help_of(["--help"], capsys)
    summary = "create, list, inspect and delete consumer groups, and replay their parked events"
    assert summary in shown


def test_a_client_command_takes_each_option_from_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ORDER_GATEWAY_AFTER", "38")
    monkeypatch.setenv("ORDER_GATEWAY_TYPE", "OrderCreated, ProductRestocked")
    monkeypatch.setenv("ORDER_GATEWAY_TLS_CA", "ca.pem")
    monkeypatch.setenv("ORDER_GATEWAY_TIMEOUT", "2.5")
    args = build_parser().parse_args(["tail"])
    assert (args.after, args.types, args.tls_ca, args.timeout) == (
        38,
        ["OrderCreated", "ProductRestocked"],
        "ca.pem",
        2.5,
    )
    monkeypatch.delenv("ORDER_GATEWAY_AFTER")  # --after and --from-end exclude each other
    monkeypatch.setenv("ORDER_GATEWAY_FROM_END", "yes")
    monkeypatch.setenv("ORDER_GATEWAY_MAX_DELIVERIES", "3")
    args = build_parser().parse_args(["group", "create", "billing"])
    assert (args.from_end, args.max_deliveries, args.types) == (
        True,
        3,
        ["OrderCreated", "ProductRestocked"],
    )
    monkeypatch.setenv("ORDER_GATEWAY_GROUP", "billing")
    assert build_parser().parse_args(["consume"]).group == "billing"


def test_a_flag_wins_over_its_variable_in_a_client_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ORDER_GATEWAY_AFTER", "not a number: the flag is used instead")
    monkeypatch.setenv("ORDER_GATEWAY_TYPE", "OrderCreated,ProductRestocked")
    monkeypatch.setenv("ORDER_GATEWAY_SERVICE", "orders.v1.OrderCommandService")
    args = build_parser().parse_args(["tail", "--after", "5", "--type", "OrderShipped"])
    assert (args.after, args.types) == (5, ["OrderShipped"])
    assert build_parser().parse_args(["health", "--service", ""]).service == ""


def test_a_flag_wins_over_the_variable_of_an_option_it_excludes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Both were sent: a group asked to start after 5 and at the end.
    monkeypatch.setenv("ORDER_GATEWAY_FROM_END", "true")
    args = build_parser().parse_args(["group", "create", "billing", "--after", "5"])
    assert (args.after, args.from_end) == (5, False)
    # Given with its default's value too: the variable won there, as if no flag was given.
    args = build_parser().parse_args(["group", "create", "billing", "--after", "0"])
    assert (args.after, args.from_end) == (0, False)
    args = build_parser().parse_args(["group", "create", "billing"])
    assert (args.after, args.from_end) == (0, True)
    # Two variables that exclude each other are refused, as two such flags are.
    monkeypatch.setenv("ORDER_GATEWAY_AFTER", "5")
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["group", "create", "billing"])
    assert refused.value.code == 2
    assert "(ORDER_GATEWAY_AFTER): not allowed with argument --from-end" in capsys.readouterr().err
    # A switch's variable set to false asks for nothing: no conflict.
    monkeypatch.setenv("ORDER_GATEWAY_FROM_END", "off")
    args = build_parser().parse_args(["group", "create", "billing"])
    assert (args.after, args.from_end) == (5, False)
    # One that is no switch value is refused as that, not as a conflict.
    monkeypatch.setenv("ORDER_GATEWAY_FROM_END", "bogus")
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["group", "create", "billing"])
    assert "(ORDER_GATEWAY_FROM_END): not a switch value" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "variable", "value", "message"),
    [
        (["tail"], "ORDER_GATEWAY_AFTER", "3_810", "argument --after (ORDER_GATEWAY_AFTER): "),
        (["tail"], "ORDER_GATEWAY_TIMEOUT", "0", "argument --timeout (ORDER_GATEWAY_TIMEOUT): "),
        (
            ["health"],
            "ORDER_GATEWAY_TIMEOUT",
            "soon",
            "argument --timeout (ORDER_GATEWAY_TIMEOUT): ",
        ),
        (
            ["group", "create", "billing"],
            "ORDER_GATEWAY_FROM_END",
            "maybe",
            "argument --from-end (ORDER_GATEWAY_FROM_END): not a switch value",
        ),
    ],
)
def test_a_bad_variable_is_a_usage_error_naming_it_and_its_option(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    variable: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_client_command_help_says_options_come_from_variables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in (["tail"], ["health"], ["consume"], ["group", "create"]):
        shown = help_of([*argv, "--help"], capsys)
        assert "Every option can also be set by its environment variable" in shown, argv
        assert "[ORDER_GATEWAY_TARGET]" in shown and "[ORDER_GATEWAY_TIMEOUT]" in shown, argv
