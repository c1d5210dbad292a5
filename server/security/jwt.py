"""JWT bearer tokens (``--jwt-public-key``): ``sub`` is the user, ``scope`` the scopes.

The signing algorithm follows from the configured key (RSA → RS256, P-256 → ES256) and
is the only one accepted, so a token cannot pick its own algorithm: ``none``, HS256
signed with the public key as a secret, and every other algorithm are refused.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from domain.errors import ConfigurationError
from server.config import read_setting_file
from server.security.auth import AuthenticationError
from server.security.identity import MAX_USER_ID_LENGTH, Caller, is_user_id

MIN_RSA_KEY_BITS = 2048
CLOCK_SKEW = dt.timedelta(seconds=30)
"""Tolerance for ``exp``/``nbf``/``iat`` between the issuer's clock and ours."""

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


VERIFIED_TOKENS = 1_000
"""Tokens each process remembers having verified, until they expire (about 1 MB)."""


@dataclass(frozen=True, slots=True)
class _Verified:
    caller: Caller
    valid_from: float
    """``nbf`` and ``iat`` less the clock skew (UNIX seconds; -inf without them)."""
    valid_until: float
    """``exp`` plus the clock skew."""


class JwtAuthenticator:
    """Verifies JWTs signed by one key; optionally requires an issuer and an audience.

    A client sends the same token with every call until it expires, and verifying it
    cost ~90 µs (RS256) to ~110 µs (ES256) of CPU each time: a token that verified is
    remembered, by its exact text (signature included), and answered from memory while
    its ``exp``, ``nbf`` and ``iat`` allow, as verifying it again would. Tokens that fail
    are not remembered.
    """

    expiring = True

    def __init__(
        self,
        key: PublicKey,
        issuer: str | None = None,
        audience: str | None = None,
        remembered: int = VERIFIED_TOKENS,
    ) -> None:
        self._key = key
        self._remembered = remembered
        self._verified: OrderedDict[str, _Verified] = OrderedDict()
        self._algorithm = algorithm_for(key)
        self._issuer = issuer
        self._audience = audience
        self._required = [
            "exp",
            "sub",
            *(["iss"] if issuer is not None else []),
            *(["aud"] if audience is not None else []),
        ]

    @classmethod
    def from_file(
        cls, path: Path, issuer: str | None = None, audience: str | None = None
    ) -> JwtAuthenticator:
        pem = read_setting_file("--jwt-public-key", path)
        try:
            key = load_pem_public_key(pem)
        except ValueError as error:
            raise ConfigurationError(
                f"--jwt-public-key {path}: not a PEM public key ({error})"
            ) from None
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise ConfigurationError(
                f"--jwt-public-key {path}: JWT keys must be RSA (RS256) or EC P-256 (ES256)"
            )
        try:
            return cls(key, issuer, audience)
        except ValueError as error:
            raise ConfigurationError(f"--jwt-public-key {path}: {error}") from None

    def authenticate(self, token: str) -> Caller | None:
        verified = self._verified.get(token)
        if verified is not None:
            if verified.valid_from <= time.time() < verified.valid_until:
                self._verified.move_to_end(token)
                return verified.caller
            del self._verified[token]  # verified again below, which says why it fails
        if not looks_like_jwt(token):
            return None  # some other authenticator's token, or an unknown one
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                issuer=self._issuer,
                audience=self._audience,
                leeway=CLOCK_SKEW,
                options={
                    "require": self._required,
                    # Without --jwt-audience the audience is not ours to check: tokens
                    # minted for this gateway commonly carry one anyway.
                    "verify_aud": self._audience is not None,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.InvalidTokenError as error:
            raise AuthenticationError(f"invalid JWT: {_reason(error)}") from None
        for name in _TIMES:
            # PyJWT reads these with int(), which takes "1765000000" too; RFC 7519 makes
            # each a JSON number (a NumericDate).
            value = claims.get(name)
            if value is not None and (type(value) is bool or not isinstance(value, int | float)):
                raise AuthenticationError(f"invalid JWT: the '{name}' claim must be a number")
        # PyJWT has checked that the times are numbers (read with int(), as it reads them)
        # that allow the token now; it allows it while nbf - skew <= now, iat - skew <= now
        # and now < exp + skew.
        caller = Caller(
            user_id=_subject(claims.get("sub")),
            scopes=_scopes(claims.get("scope")),
            expires_at=int(claims["exp"]) + CLOCK_SKEW.total_seconds(),
        )
        self._remember(token, caller, claims)
        return caller

    def _remember(self, token: str, caller: Caller, claims: dict[str, Any]) -> None:
        skew = CLOCK_SKEW.total_seconds()
        starts = [int(claims[name]) for name in ("nbf", "iat") if name in claims]
        assert caller.expires_at is not None
        self._verified[token] = _Verified(
            caller,
            valid_from=max(starts) - skew if starts else -math.inf,
            valid_until=caller.expires_at,
        )
        if len(self._verified) > self._remembered:
            self._verified.popitem(last=False)


_TIMES = ("exp", "nbf", "iat")


def looks_like_jwt(token: str) -> bool:
    """The compact form's three dot-separated parts, or a first part that is a JSON header.

    Such a token is answered with why it failed verification, not as merely unknown.
    """
    if token.count(".") == 2:
        return True
    head = token.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, RecursionError):
        return False
    return isinstance(header, dict)


def algorithm_for(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_KEY_BITS:
            raise ConfigurationError(
                f"RSA key of {key.key_size} bits; at least {MIN_RSA_KEY_BITS} needed"
            )
        return "RS256"
    if isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise ConfigurationError(f"EC key on curve {key.curve.name}; ES256 needs P-256 (secp256r1)")


def _reason(error: jwt.InvalidTokenError) -> str:
    # Our own words, so that nothing from the token itself is echoed to the caller.
    match error:
        case jwt.ExpiredSignatureError():
            return "it has expired"
        case jwt.ImmatureSignatureError():
            return "it is not valid yet"
        case jwt.MissingRequiredClaimError():
            return f"the {error.claim!r} claim is missing"
        case jwt.InvalidIssuerError():
            return "the issuer ('iss') is not accepted"
        case jwt.InvalidAudienceError():
            return "the audience ('aud') is not accepted"
        case jwt.InvalidAlgorithmError():
            return "the signing algorithm is not accepted"
        case jwt.InvalidSignatureError():
            return "the signature does not verify"
        case jwt.InvalidKeyError():
            return "the signing key is not accepted"
        case _:
            return "it is malformed"


def _subject(sub: object) -> str:
    # The subject becomes Event.user_id on every event the caller causes: keep it printable.
    if not isinstance(sub, str) or not is_user_id(sub):
        raise AuthenticationError(
            f"invalid JWT: 'sub' must be 1 to {MAX_USER_ID_LENGTH} printable characters"
        )
    return sub


def _scopes(scope: object) -> frozenset[str]:
    if scope is None:
        return frozenset()
    if not isinstance(scope, str):
        raise AuthenticationError("invalid JWT: 'scope' must be a space-separated string")
    return frozenset(scope.split())
