"""The ``order-gateway`` command: serve, migrate, tail.

Flags are optional overrides of ``ORDER_GATEWAY_*`` variables: only the flags given on
the command line are passed to ``Settings``, so a flag wins and a variable fills the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from domain.errors import StoreError
from server.config import Settings
from server.observability.logs import configure_logging


class ConfigurationError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="order-gateway", description="gRPC command gateway for the write side of CQRS."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--listen", metavar="HOST:PORT")
    serve.add_argument("--store", metavar="URL")
    serve.add_argument("--auth-tokens", metavar="FILE")
    serve.add_argument("--jwt-public-key", metavar="FILE")
    serve.add_argument("--jwt-issuer", metavar="ISS")
    serve.add_argument("--jwt-audience", metavar="AUD")
    serve.add_argument("--tls-cert", metavar="FILE")
    serve.add_argument("--tls-key", metavar="FILE")
    serve.add_argument("--tls-client-ca", metavar="FILE")
    serve.add_argument("--insecure", action="store_const", const=True)
    serve.add_argument("--metrics-listen", metavar="HOST:PORT")
    serve.add_argument("--otel", action="store_const", const=True)
    serve.add_argument("--log-format", choices=["text", "json"])
    serve.add_argument("--log-level", metavar="LEVEL")
    serve.add_argument("--workers", metavar="N", type=int)

    migrate = commands.add_parser("migrate", help="create or upgrade the store's schema, then exit")
    migrate.add_argument("--store", metavar="URL")

    tail = commands.add_parser("tail", help="print committed events as JSON lines")
    tail.add_argument("--target", metavar="HOST:PORT", default="127.0.0.1:50051")
    tail.add_argument("--after", metavar="N", type=int, default=0)
    tail.add_argument("--type", metavar="NAME", action="append", default=[], dest="types")

    health = commands.add_parser(
        "health", help="exit 0 if the gateway's health service says SERVING (for containers)"
    )
    health.add_argument(
        "--target", metavar="HOST:PORT", help="default: this host, at the port --listen names"
    )
    health.add_argument("--service", metavar="NAME", default="", help="default: the server")
    health.add_argument("--timeout", metavar="SECONDS", type=float, default=3.0)
    return parser


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
    try:
        settings = settings_from(args)
        configure_logging(settings.log_format, settings.log_level)
        if args.command == "serve":
            from server.app import serve
            from server.workers.supervisor import supervise, worker_count

            check_exposure(settings)
            if worker_count(settings.workers) > 1:
                asyncio.run(supervise(settings))
            else:
                asyncio.run(serve(settings))
        elif args.command == "migrate":
            from server.stores.factory import migrate

            asyncio.run(migrate(settings.store))
        elif args.command == "health":
            from server.client.health import check_health, local_target

            target = args.target or local_target(settings.listen)
            return check_health(target, args.service, args.timeout)
        else:
            from server.client.tail import tail

            return tail(args.target, args.after, args.types)
    except ValidationError as error:
        for problem in _problems(error):
            print(f"order-gateway: {problem}", file=sys.stderr)
        return 2
    except (ConfigurationError, ValueError, OSError) as error:
        print(f"order-gateway: {error}", file=sys.stderr)
        return 2
    except StoreError as error:
        # The store's own message (no driver traceback); its cause is in the log.
        print(f"order-gateway: store error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        # grpcio reports an address it cannot bind as a RuntimeError.
        print(f"order-gateway: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
