"""The gateway's settings: one model, filled from ``ORDER_GATEWAY_*`` variables and CLI flags.

A flag wins over a variable because the CLI passes flags as init arguments, which
pydantic-settings ranks above the environment. docs/configuration.md is generated from
this model (``python -m server.config_docs``), so the two cannot drift.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from domain.errors import ConfigurationError
from domain.snapshots import DEFAULT_INTERVAL as SNAPSHOT_INTERVAL
from server.event_loop import EventLoopName
from server.stores.urls import redacted_url

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
"""``--log-level`` values, in any case."""


CREDENTIAL_SETTINGS = ("auth_tokens", "jwt_public_key", "tls_cert", "tls_key", "tls_client_ca")
"""The settings naming files that say who may call and how (read at start only)."""

_AS_STARTED: dict[Path, bytes] = {}
"""Files of ``CREDENTIAL_SETTINGS`` as the gateway read them when it started, served by
``read_setting_file`` in place of the files as they are now (``keep_setting_files``)."""


def keep_setting_files(files: Mapping[str, bytes]) -> None:
    """From now on, read each file of ``files`` (by path) as given, not from the disk.

    ``serve --workers`` reads the credential files once, in the supervisor, and every
    worker, a replacement too, serves with those bytes: read anew, a worker replaced
    after the files changed would serve other tokens or certificates than the rest (a
    revoked token still valid on some connections), where one process serves the files
    it started with until it restarts."""
    _AS_STARTED.update({Path(path): content for path, content in files.items()})


def credential_files(settings: Settings) -> dict[str, bytes]:
    """The credential files ``settings`` names, read now, by path."""
    return {
        str(path): read_setting_file(f"--{name.replace('_', '-')}", path)
        for name in CREDENTIAL_SETTINGS
        if (path := getattr(settings, name)) is not None
    }


def read_setting_file(option: str, path: Path | str) -> bytes:
    """The bytes of the file a setting names; one that cannot be read is a
    ``ConfigurationError`` naming the setting and the file (a path, never a secret).

    ``option`` is the flag; a setting of ``Settings`` is named by its variable too, for
    it may have come from either."""
    if (kept := _AS_STARTED.get(Path(path))) is not None:
        return kept
    try:
        return Path(path).read_bytes()
    except OSError as error:
        setting = option.removeprefix("--").replace("-", "_")
        if setting in Settings.model_fields:
            option = f"{option} ({variable_name(setting)})"
        raise ConfigurationError(f"{option} {path}: {error.strerror or error}") from None


def variable_name(setting: str) -> str:
    """The environment variable that sets ``setting``: ``ORDER_GATEWAY_`` and its name."""
    return f"{Settings.model_config.get('env_prefix', '')}{setting}".upper()


GRPC_INT_MAX = 2**31 - 1
"""grpc takes these settings as C ints."""


def split_host_port(address: str) -> tuple[str, int]:
    """``"0.0.0.0:9090"`` → ``("0.0.0.0", 9090)``; ``"[::]:9090"`` → ``("::", 9090)``.

    The port must be 0 to 65535: grpc would take 99999 modulo 65536 and listen on 34463.
    """
    host, separator, port = address.rpartition(":")
    if not separator or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        # The message leaves the value out, as every setting's does (see server.cli).
        raise ValueError("not HOST:PORT with a port from 0 to 65535")
    bracketed = host.startswith("[") and host.endswith("]")
    if not bracketed and (":" in host or "[" in host or "]" in host):
        # "::1:50051" could be read more than one way; grpc takes it for a name.
        raise ValueError("an IPv6 address goes in brackets: [ADDRESS]:PORT")
    if bracketed:
        host = host[1:-1]
    # grpc refuses an empty host, and an IPv4 address in brackets, only as it binds, with
    # a log line of its own, while --workers and the metrics server took ":PORT" for
    # every interface: refused here, every path takes the same addresses.
    if not host:
        raise ValueError(f"no host: {ADDRESS_FORMS}; 0.0.0.0 or [::] for every interface")
    if bracketed and not _is_ipv6(host):
        raise ValueError(f"only an IPv6 address goes in brackets: {ADDRESS_FORMS}")
    return host, int(port)


ADDRESS_FORMS = "HOST:PORT or [IPv6]:PORT"
"""The forms of a listen address, as messages name them."""


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


MAX_WORKERS = 256
"""More processes than any host's CPUs can use, each a full gateway in memory."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORDER_GATEWAY_", extra="forbid", frozen=True)

    listen: str = Field("127.0.0.1:50051", description="HOST:PORT the gRPC server listens on.")
    store: str = Field(
        "sqlite:///order-gateway.db",
        description="Event store URL: sqlite:///relative.db, sqlite:////absolute.db, "
        "postgresql://user:pass@host:port/db, or memory:// (tests only).",
    )
    store_pool_size: int = Field(
        10,
        ge=3,
        description="PostgreSQL connections each gateway process keeps at most (plus one "
        "for LISTEN, and while replicas contend for streams up to half as many plus one "
        "for their locks): two carry appends, the rest reads. A call waiting over 10 s for one "
        "is UNAVAILABLE (STORE_UNAVAILABLE). Sizing: docs/operations.md.",
    )
    auth_tokens: Path | None = Field(
        None, description="TOML file of bearer tokens, stored as SHA-256 hashes."
    )
    jwt_public_key: Path | None = Field(
        None, description="PEM public key (RS256 or ES256) for JWT bearer tokens."
    )
    jwt_issuer: str | None = Field(None, description="Required `iss` claim of JWTs.")
    jwt_audience: str | None = Field(None, description="Required `aud` claim of JWTs.")
    tls_cert: Path | None = Field(None, description="PEM server certificate (enables TLS).")
    tls_key: Path | None = Field(None, description="PEM private key of the server certificate.")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed."
    )
    insecure: bool = Field(
        False,
        description="Allow listening on a non-loopback address without authentication.",
    )
    metrics_listen: str | None = Field(
        None, description="HOST:PORT serving Prometheus metrics at /metrics (off when unset)."
    )
    otel: bool = Field(
        False,
        description="Export OpenTelemetry traces over OTLP (needs the `otel` extra; the "
        "exporter reads the standard OTEL_EXPORTER_OTLP_* variables).",
    )
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING, ERROR.")
    event_loop: EventLoopName = Field(
        "uvloop",
        description="The event loop `serve` runs on: uvloop (faster: about 9 % less CPU per "
        "call) or asyncio's own.",
    )
    max_request_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        le=GRPC_INT_MAX,
        description="Largest request message accepted; larger is RESOURCE_EXHAUSTED.",
    )
    max_concurrent_streams: int = Field(
        1000, ge=1, le=GRPC_INT_MAX, description="Most RPCs served at once by this process."
    )
    max_subscribers: int = Field(
        500, ge=1, description="Most open Subscribe streams at once; more is RESOURCE_EXHAUSTED."
    )
    shutdown_grace: float = Field(
        5.0,
        ge=0,
        description="Seconds in-flight calls get to finish on SIGTERM/SIGINT/SIGHUP; the stop ends "
        "within this + 2 s, and within 9 s whatever it is (with --workers, a worker still "
        "running then is killed half a second later).",
    )
    workers: int = Field(
        1,
        ge=0,
        le=MAX_WORKERS,
        description=(
            f"Serving processes sharing the listen address (0: one per CPU; at most "
            f"{MAX_WORKERS}). With more "
            "than one, a supervisor process starts them and replaces any that dies; on "
            "SQLite they take turns at the file's write lock; memory:// takes 1 only "
            "(more is refused: each process would keep a log of its own)."
        ),
    )
    aggregate_cache: int = Field(
        10_000,
        ge=0,
        description=(
            "Orders and products kept in memory between commands (about 1.6 KB each); a "
            "command on one that is not kept reads its events back from the store first."
        ),
    )
    snapshot_interval: int = Field(
        SNAPSHOT_INTERVAL,
        ge=0,
        description=(
            "A product's state is saved in the store, in the background, each time its "
            "stream grows past a multiple of this many events, so that loading it after a "
            "restart replays at most this many; 0 turns snapshots off."
        ),
    )

    @field_validator("log_format", "event_loop", mode="before")
    @classmethod
    def _choice_in_any_case(cls, choice: object) -> object:
        # As the log level: JSON is json.
        return choice.lower() if isinstance(choice, str) else choice

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, level: str) -> str:
        if level.upper() not in LOG_LEVELS:
            raise ValueError(f"not one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator(
        "auth_tokens", "jwt_public_key", "tls_cert", "tls_key", "tls_client_ca", mode="before"
    )
    @classmethod
    def _check_file_named(cls, path: object) -> object:
        # An empty variable (a manifest's `value: ""`) would be the working directory.
        if isinstance(path, str) and not path.strip():
            raise ValueError("empty: name a file, or leave the setting unset")
        return path

    @field_validator("jwt_issuer", "jwt_audience", mode="before")
    @classmethod
    def _check_claim_named(cls, value: object) -> object:
        # An empty variable (a template expanding an unset one) would turn the check off
        # unnoticed: every issuer, or every audience, accepted.
        if isinstance(value, str) and not value.strip():
            raise ValueError(
                "empty: name the value the claim must have, or leave the setting unset"
            )
        return value

    @field_validator("store", "listen", "metrics_listen", "jwt_issuer", "jwt_audience")
    @classmethod
    def _check_unpadded(cls, value: str | None) -> str | None:
        # A space or newline kept from a file or template would not be noticed: a store
        # URL naming "events.db " serves a new, empty store, an issuer "https://idp "
        # matches no token's. The message leaves the value out (see server.cli).
        if value is not None and value != value.strip():
            raise ValueError("white space before or after the value: remove it")
        return value

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _check_port(cls, address: str | None) -> str | None:
        if address is not None:
            split_host_port(address)
        return address

    @model_validator(mode="after")
    def _check_companions(self) -> Settings:
        # Options that mean nothing alone are refused rather than silently ignored.
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if (self.jwt_issuer is not None or self.jwt_audience is not None) and (
            self.jwt_public_key is None
        ):
            raise ValueError("--jwt-issuer and --jwt-audience need --jwt-public-key")
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # repr() and str() of the settings, and of errors quoting them, show the store URL
        # as the log does: without its password.
        for name, value in super().__repr_args__():
            yield name, redacted_url(value) if name == "store" else value

    @property
    def authentication_enabled(self) -> bool:
        return self.auth_tokens is not None or self.jwt_public_key is not None
