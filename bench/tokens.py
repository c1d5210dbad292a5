"""A signing key and a JWT for the ``jwt`` workload: what a gateway behind an identity
provider verifies on every call."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

TOKEN_LIFETIME = 24 * 3600
"""Seconds: longer than any run."""


@dataclass(frozen=True)
class BenchIssuer:
    public_key_file: Path
    """For ``serve --jwt-public-key``."""
    token: str
    """RS256, with every scope the load needs."""


def bench_issuer(folder: Path) -> BenchIssuer:
    """A new RSA key (2048 bits, RS256, as identity providers commonly sign) and a token."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_key_file = folder / "bench-issuer.pub.pem"
    public_key_file.write_bytes(
        key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    claims = {
        "sub": "bench-client",
        "scope": "orders:write inventory:write",
        "exp": int(time.time()) + TOKEN_LIFETIME,
    }
    return BenchIssuer(public_key_file, jwt.encode(claims, key, algorithm="RS256"))


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``, or none without one."""
    return (("authorization", f"Bearer {token}"),) if token else ()
