"""Authentication and per-RPC scope checks, done by one server interceptor.

Credentials arrive as ``authorization: Bearer <token>`` metadata. Health and reflection
need none. The interceptor sets ``server.identity.current_caller`` for the call.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc

from domain.errors import ConfigurationError
from server.config import read_setting_file
from server.rpc.method_handlers import (
    CallScope,
    Context,
    EarlyCheck,
    Handler,
    Metadata,
    WrappingInterceptor,
    checked_first,
    is_streaming_response,
    wrapped,
)
from server.rpc.status_mapping import plain_status
from server.security.identity import (
    ALL_SCOPES,
    ANONYMOUS,
    MAX_USER_ID_LENGTH,
    Caller,
    current_caller,
    is_user_id,
)
from server.security.scopes import COMMANDS, OPEN_SERVICES, REQUIRED_SCOPES

log = logging.getLogger("order_gateway.auth")


class AuthenticationError(Exception):
    """No, malformed, unknown or expired credentials."""


class Authenticator(Protocol):
    expiring: bool
    """Whether the callers it authenticates may expire (``Caller.expires_at``)."""

    def authenticate(self, token: str) -> Caller | None:
        """The caller the token identifies, None if this authenticator does not know it.

        Raises AuthenticationError for a token it recognises as its own but rejects.
        """
        ...


TOKEN_KEYS = frozenset({"sha256", "user_id", "scopes"})


class TokenFileAuthenticator:
    """Static bearer tokens from a TOML file that holds only their SHA-256 hashes."""

    expiring = False

    def __init__(self, entries: dict[bytes, Caller]) -> None:
        self._entries = entries

    @classmethod
    def from_file(cls, path: Path) -> TokenFileAuthenticator:
        try:
            # utf-8-sig: an editor on Windows may start the file with a byte order mark,
            # which TOML itself does not allow.
            text = read_setting_file("--auth-tokens", path).decode("utf-8-sig")
            document = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigurationError(f"--auth-tokens {path}: not valid TOML: {error}") from error
        unknown = sorted(set(document) - {"token"})
        if unknown:
            # A misspelt table ([[tokens]]) would otherwise leave the file without tokens.
            raise ConfigurationError(
                f"--auth-tokens {path}: unknown key {', '.join(unknown)}"
                " (each token is a [[token]] table)"
            )
        tokens = document.get("token", [])
        if not isinstance(tokens, list):
            # A number or switch cannot be read as tokens, a string or table would be
            # read as its characters or keys.
            raise ConfigurationError(f"--auth-tokens {path}: token must be [[token]] tables")
        entries: dict[bytes, Caller] = {}
        for n, token in enumerate(tokens):
            where = f"--auth-tokens {path}: token[{n}]"
            if not isinstance(token, dict):
                raise ConfigurationError(f"{where} must be a [[token]] table")
            missing = {"sha256", "user_id"} - token.keys()
            if missing:
                raise ConfigurationError(f"{where} needs {' and '.join(sorted(missing))}")
            if unknown := sorted(token.keys() - TOKEN_KEYS):
                # A misspelt key (scope) would leave a token without what it was meant to
                # have, and one the gateway does not know (expires) do nothing.
                raise ConfigurationError(
                    f"{where}: unknown key {', '.join(unknown)} (a token has sha256,"
                    " user_id and scopes)"
                )
            digest = str(token["sha256"]).lower()
            if re.fullmatch("[0-9a-f]{64}", digest) is None:
                raise ConfigurationError(f"{where}.sha256 is not a hex SHA-256 digest")
            scopes = token.get("scopes", [])
            # A bare string would silently become a set of single characters.
            if not isinstance(scopes, list) or not all(
                isinstance(scope, str) and scope in ALL_SCOPES for scope in scopes
            ):
                known = ", ".join(sorted(ALL_SCOPES))
                raise ConfigurationError(f"{where}.scopes must be a list of {known}")
            user_id = token["user_id"]
            if not isinstance(user_id, str) or not is_user_id(user_id):
                raise ConfigurationError(
                    f"{where}.user_id must be 1 to {MAX_USER_ID_LENGTH} printable characters,"
                    " not only spaces"
                )
            if (hashed := bytes.fromhex(digest)) in entries:
                # One token, two callers: whichever came last would have won, silently.
                raise ConfigurationError(
                    f"{where}.sha256 is the digest of an earlier token's: a token is one caller"
                )
            entries[hashed] = Caller(user_id=user_id, scopes=frozenset(scopes))
        if not entries:
            raise ConfigurationError(
                f"--auth-tokens {path}: no [[token]] table: no caller could authenticate"
                " with a token"
            )
        return cls(entries)

    def authenticate(self, token: str) -> Caller | None:
        digest = hashlib.sha256(token.encode()).digest()
        found: Caller | None = None
        # Compare against every entry in constant time, so timing reveals nothing.
        for known, caller in self._entries.items():
            if hmac.compare_digest(known, digest):
                found = caller
        return found


class AuthInterceptor(WrappingInterceptor):
    """Authenticates every call to a method other than the open ones and checks its scopes.

    A method with no scope assigned is refused, whoever calls: an RPC added without a
    scope stays closed until it gets one. With no authenticators, every caller is
    anonymous with all scopes. Credentials are read from each call's own metadata as the
    call arrives (``early_check``), before grpc reads its request: a caller without them
    cannot hold a place among the server's concurrent calls by withholding the request
    message.
    """

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        super().__init__()
        self._authenticators = tuple(authenticators)
        self._expiring = any(a.expiring for a in authenticators)

    def applies_to(self, method: str, handler: Handler) -> bool:
        # Left to the handler: the refusal of a method without a scope (with
        # authentication off every caller is ANONYMOUS, which ``current_caller`` already
        # is unless set, and with it on the early check has admitted the caller); and,
        # where credentials expire, the end of a stream whose caller's have.
        if method.startswith(OPEN_SERVICES):
            return False
        if method not in REQUIRED_SCOPES:
            return True
        # A command's streamed answer is short, and cancelling it could not undo a commit
        # already made: it would answer UNAUTHENTICATED for an order that stands.
        return self._expiring and method not in COMMANDS and is_streaming_response(handler)

    def early_check(self) -> EarlyCheck | None:
        return self._admit if self._authenticators else None

    def _admit(self, method: str, metadata: Metadata) -> grpc.Status | None:
        required = REQUIRED_SCOPES.get(method)
        if required is None:
            return None  # Open, or refused by the handler ``wrap`` builds.
        verdict = self._verdict(metadata, method, required)
        if isinstance(verdict, grpc.Status):
            return verdict
        # In the call's own task: the caller for the rest of the call.
        current_caller.set(verdict)
        return None

    def wrap(self, handler: Handler, method: str) -> Handler:
        if method in REQUIRED_SCOPES:
            return wrapped(handler, _until_the_credentials_expire)
        log.error("refusing calls to %s: the method has no scope assigned", method)
        refusal = plain_status(
            grpc.StatusCode.PERMISSION_DENIED, "this method has no scope assigned"
        )

        async def refuse(request: Any, context: Context) -> None:
            await context.abort_with_status(refusal)

        return checked_first(handler, refuse)

    def _verdict(
        self, metadata: Iterable[tuple[str, Any]], method: str, required: frozenset[str]
    ) -> Caller | grpc.Status:
        """The authenticated caller, or the status that refuses the call.

        An authenticator's unexpected error propagates: the last-resort handler answers
        it INTERNAL with a generic message, so a hostile token cannot make it leak.
        """
        try:
            caller = self._caller(metadata)
        except AuthenticationError as error:
            # The message never holds the token: authenticators word their own reasons.
            log.info("refused %s: %s", method, error)
            return plain_status(grpc.StatusCode.UNAUTHENTICATED, str(error))
        if not caller.scopes & required:
            needed = " or ".join(sorted(required))
            log.info("refused %s to %r: lacks scope %s", method, caller.user_id, needed)
            # Known, though refused: the access line names who was refused.
            current_caller.set(caller)
            return plain_status(
                grpc.StatusCode.PERMISSION_DENIED, f"this call needs scope {needed}"
            )
        return caller

    def _caller(self, metadata: Iterable[tuple[str, Any]]) -> Caller:
        if not self._authenticators:
            return ANONYMOUS
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            raise AuthenticationError("missing authorization metadata (Bearer token)")
        if len(values) > 1:
            # Which of them a proxy or a client meant is not the gateway's to guess.
            raise AuthenticationError(
                f"{len(values)} authorization headers: send one 'Bearer <token>'"
            )
        scheme, _, token = str(values[0]).partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("authorization must be 'Bearer <token>'")
        for authenticator in self._authenticators:
            caller = authenticator.authenticate(token.strip())
            if caller is not None:
                return caller
        raise AuthenticationError("unknown bearer token")


def _until_the_credentials_expire(request: Any, context: Context) -> CallScope | None:
    expires_at = current_caller.get().expires_at
    return None if expires_at is None else _EndsWhenCredentialsExpire(context, expires_at)


class _EndsWhenCredentialsExpire(CallScope):
    """Ends a stream (Subscribe, Consume) UNAUTHENTICATED once its caller's credentials
    expire: they are checked as the call arrives, and a stream may stay open for hours,
    delivering events to a token that expired long before."""

    __slots__ = ("_context", "_expired", "_expires_at", "_timer")

    def __init__(self, context: Context, expires_at: float) -> None:
        self._context = context
        self._expires_at = expires_at
        self._expired = False
        self._timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, self._expires_at - time.time()), self._expire, task
        )

    def _expire(self, task: asyncio.Task[Any]) -> None:
        self._expired = True
        task.cancel()

    async def end(self, error: BaseException | None) -> bool:
        if self._timer is not None:
            self._timer.cancel()
        if self._expired and isinstance(error, asyncio.CancelledError):
            log.info("ended a stream: its caller's credentials expired")
            await self._context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "the credentials expired while the stream was open"
            )
        return False
