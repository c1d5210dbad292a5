"""The ``order-gateway`` command: serve, migrate, verify, backup, tail, group, consume,
health.

Flags are optional overrides of ``ORDER_GATEWAY_*`` variables: only the flags given on
the command line are passed to ``Settings``, so a flag wins and a variable fills the rest.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from domain.errors import ConfigurationError, StoreError
from server.client.environment import EnvironmentParser, read_environment
from server.client.groups import (
    add_client_flags,
    add_connection_timeout,
    add_tls_flags,
    positive_seconds,
    target_address,
    whole_number,
)
from server.client.groups import add_parsers as add_group_parsers
from server.client.output import UnwritableOutputError, guarded_stdout, unwritable_output
from server.config import Settings, variable_name
from server.launch import release_signals
from server.observability.logs import configure_logging

CLIENT_COMMANDS = ("tail", "health", "group", "consume")
"""The commands that call a gateway: their options also come from variables of their own
(``server.client.environment``); the others' from the settings."""


def build_parser() -> argparse.ArgumentParser:
    parser = EnvironmentParser(
        prog="order-gateway",
        description="gRPC command gateway for the write side of CQRS.",
        epilog="Run 'order-gateway COMMAND --help' for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = _command(
        commands,
        "serve",
        "run the gateway",
        "Run the gateway until SIGTERM, SIGINT or SIGHUP, creating or upgrading the store's schema "
        "first. Every option can also be set by its environment variable; an option given "
        "here wins over the variable.",
    )
    _setting(serve, "listen", metavar="HOST:PORT")
    _setting(serve, "store", metavar="URL")
    _setting(serve, "store_pool_size", metavar="N", type=int)
    _setting(serve, "auth_tokens", metavar="FILE")
    _setting(serve, "jwt_public_key", metavar="FILE")
    _setting(serve, "jwt_issuer", metavar="ISS")
    _setting(serve, "jwt_audience", metavar="AUD")
    _setting(serve, "tls_cert", metavar="FILE")
    _setting(serve, "tls_key", metavar="FILE")
    _setting(serve, "tls_client_ca", metavar="FILE")
    _setting(serve, "insecure", action="store_const", const=True)
    _setting(serve, "metrics_listen", metavar="HOST:PORT")
    _setting(serve, "otel", action="store_const", const=True)
    _setting(serve, "log_format", choices=["text", "json"], type=str.lower)
    _setting(serve, "log_level", metavar="LEVEL")
    _setting(serve, "workers", metavar="N", type=int)

    migrate = _command(
        commands,
        "migrate",
        "create or upgrade the store's schema, then exit",
        "Apply the store's missing schema migrations, then exit (serve also does this when "
        "it starts).",
    )
    _setting(migrate, "store", metavar="URL")

    verify = _command(
        commands,
        "verify",
        "check the whole event log; exit 1 on any violation",
        "Read every event of the store and check it: positions 1..N without gap or repeat, "
        "stream versions 1..n, every event id a UUID that no other event has, every event "
        "decodes, every command record points at its events, no product's stock goes "
        "negative, and the events agree with each other (each in its order's or product's "
        "stream, an order's amounts adding up, its reservations and releases its items); "
        "on SQLite, first the whole file with SQLite's integrity check. Prints a summary "
        "and each violation by position; exits 1 if there was any, even when the report "
        "cannot be written. Only reads: a store of an older schema is refused, not "
        "upgraded (run migrate first).",
    )
    _setting(verify, "store", metavar="URL")

    backup = _command(
        commands,
        "backup",
        "copy a SQLite store consistently, while it serves, to a new FILE",
        "Copy a SQLite store through SQLite's online backup API: whole commits only, while "
        "the gateway keeps serving. FILE must not exist. PostgreSQL: use pg_dump.",
    )
    _setting(backup, "store", metavar="URL")
    # As given, not a Path: Path drops the trailing "/" of a directory's name.
    backup.add_argument("file", metavar="FILE", help="the new copy's path")

    tail = _command(
        commands,
        "tail",
        "print committed events as JSON lines",
        "Follow the gateway's event stream (Subscribe) and print each committed event as one "
        "JSON line, until Ctrl-C. A failed call exits 1 with its status.",
    )
    tail.add_argument(
        "--after",
        metavar="N",
        type=whole_number(64),
        default=0,
        help="print only events at positions after N, e.g. the last position you printed "
        "(default: 0, from the first event)",
    )
    tail.add_argument(
        "--type",
        metavar="NAME",
        action="append",
        default=[],
        dest="types",
        help="print only events of this type, e.g. OrderCreated; repeat it for several "
        "types (default: every type)",
    )
    tail.add_argument(
        "--stream",
        metavar="STREAM_ID",
        default="",
        help="print only the events of this stream, order-<order id> or product-<product id> "
        "(default: every stream)",
    )
    add_client_flags(tail, target="the gateway to follow")
    add_connection_timeout(tail)
    add_group_parsers(commands)

    health = _command(
        commands,
        "health",
        "exit 0 if the gateway's health service says SERVING (for containers)",
        "Ask the gateway's gRPC health service for a status and print it; exit 0 only if "
        "it is SERVING (the container health check).",
    )
    health.add_argument(
        "--target",
        metavar="HOST:PORT",
        type=target_address,
        help=f"the gateway to ask (default: the address of {variable_name('listen')}, a"
        " wildcard host read as loopback, or 127.0.0.1:50051)",
    )
    health.add_argument(
        "--service",
        metavar="NAME",
        default="",
        help="the service to ask about, e.g. orders.v1.OrderCommandService (default: the "
        "whole server)",
    )
    health.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=positive_seconds,
        default=3.0,
        help="how long to wait for an answer (default: %(default)s)",
    )
    add_tls_flags(health)
    for client in CLIENT_COMMANDS:
        read_environment(commands.choices[client])
    return parser


def _command(
    commands: argparse._SubParsersAction[EnvironmentParser],
    name: str,
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=summary, description=description)


def _setting(command: argparse.ArgumentParser, setting: str, **options: Any) -> None:
    """An option that sets ``setting``, described as docs/configuration.md describes it."""
    field = Settings.model_fields[setting]
    default = "" if field.default in (None, False) else f", default {field.default}"
    # argparse expands %-formats in help: a literal % must be doubled.
    described = f"{field.description} [{variable_name(setting)}{default}]".replace("%", "%%")
    command.add_argument(f"--{setting.replace('_', '-')}", help=described, **options)


def settings_from(args: argparse.Namespace) -> Settings:
    given: dict[str, Any] = {
        key: value
        for key, value in vars(args).items()
        if key in Settings.model_fields and value is not None
    }
    return Settings(**given)


def check_exposure(settings: Settings) -> None:
    """Without authentication, refuse a non-loopback address unless --insecure."""
    if settings.authentication_enabled or settings.insecure:
        return
    host = settings.listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigurationError(
            f"refusing to listen on {settings.listen} without authentication: every caller "
            "would be anonymous with all scopes. Use --auth-tokens or --jwt-public-key, "
            "listen on a loopback address, or pass --insecure to accept the risk."
        )


def _problems(error: ValidationError) -> list[str]:
    # pydantic's own rendering repeats the input, which may hold the store's password.
    return [
        ": ".join(
            part
            for part in (
                ".".join(map(str, detail["loc"])),
                detail["msg"].removeprefix("Value error, "),
            )
            if part
        )
        for detail in error.errors()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fatal: logging.Logger | None = None
    try:
        settings = settings_from(args)
        configure_logging(settings.log_format, settings.log_level)
        fatal = _fatal_error_logger(args, settings)
        with guarded_stdout():
            return _dispatch(args, settings)
    except UnwritableOutputError as error:
        return unwritable_output("order-gateway", error, "the output")
    except ValidationError as error:
        for problem in _problems(error):
            _report(problem, fatal)
        return 2
    # ConfigurationError is a ValueError, as are the settings' own checks.
    except ValueError as error:
        _report(str(error), fatal)
        return 2
    except OSError as error:
        _report(_os_error_text(error), fatal)
        return 2
    except StoreError as error:
        # The store's own message (no driver traceback); its cause is in the log.
        _report(f"store error: {error}", fatal)
        return 1
    except RuntimeError as error:
        # grpcio reports an address it cannot bind as a RuntimeError.
        _report(str(error), fatal)
        return 1


def _fatal_error_logger(args: argparse.Namespace, settings: Settings) -> logging.Logger | None:
    """The logger that reports the error ending ``serve`` under ``--log-format json``: a
    plain line there would be the one line of its log that is not JSON. That of the
    process that failed: the gateway's, or with ``--workers`` the supervisor's. None for
    the text format and the other commands, whose errors are plain lines."""
    if args.command != "serve" or settings.log_format != "json":
        return None
    from server.workers.supervisor import worker_count

    workers = worker_count(settings.workers) > 1
    return logging.getLogger("order_gateway.workers" if workers else "order_gateway.server")


def _report(message: str, fatal: logging.Logger | None) -> None:
    """Write the error that ends the command: ``order-gateway: message``, or an ERROR
    record of ``fatal``."""
    if fatal is None:
        print(f"order-gateway: {message}", file=sys.stderr)
        return
    # --log-level goes no higher than ERROR: the line is always written.
    fatal.error("%s", message)


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    """Run the command ``args`` names; its exit status."""
    if args.command != "serve":
        release_signals(interrupt_exits_zero=args.command in ("tail", "consume"))
    if getattr(args, "target", "") is None:
        # A client command's default: the gateway this host's settings would serve.
        from server.client.health import local_target

        args.target = local_target(settings.listen)
    if args.command == "serve":
        from server import event_loop
        from server.app import serve
        from server.open_files import raise_open_file_limit
        from server.workers.supervisor import supervise, worker_count

        check_exposure(settings)
        raise_open_file_limit()
        if worker_count(settings.workers) > 1:
            event_loop.run(supervise(settings), settings.event_loop)
        else:
            event_loop.run(serve(settings), settings.event_loop)
    elif args.command == "migrate":
        from server import interrupted_once
        from server.stores.factory import is_memory_url, migrate

        if is_memory_url(settings.store):
            # Its schema lives and dies with the process that opens it: an exit 0 here
            # would tell a deployment script that a store was made ready.
            print(
                f"order-gateway: {settings.store} is a store of the process that opens it:"
                " there is no schema to migrate",
                file=sys.stderr,
            )
            return 2
        interrupted_once.run(migrate(settings.store))
    elif args.command == "verify":
        from server import interrupted_once
        from server.verify import run_verify

        return interrupted_once.run(run_verify(settings.store))
    elif args.command == "backup":
        from server.backup import BackupError, backup, stops_interrupt

        try:
            with stops_interrupt():
                events = backup(settings.store, args.file)
        except BackupError as error:
            print(f"order-gateway: {error}", file=sys.stderr)
            return 1
        print(f"backed up {events} events to {args.file}")
    elif args.command == "health":
        from server.client.health import check_health

        return check_health(
            args.target, args.service, args.timeout, args.tls_ca, args.tls_server_name
        )
    elif args.command == "group":
        from server.client.groups import run_group

        return run_group(args, sys.stdout)
    elif args.command == "consume":
        from server.client.groups import consume

        return consume(args)
    else:
        from server.client.tail import tail

        return tail(
            args.target,
            args.after,
            args.types,
            args.token,
            args.tls_ca,
            args.stream,
            args.timeout,
            args.tls_server_name,
        )
    return 0


def _os_error_text(error: OSError) -> str:
    """The error as a person reads it: its text and file, without the ``[Errno N]`` that
    ``str(error)`` puts first."""
    if not error.strerror:
        return str(error)
    if error.filename is None:
        return error.strerror
    return f"{error.strerror}: {error.filename}"


if __name__ == "__main__":
    sys.exit(main())
