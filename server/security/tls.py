"""The listening port from settings: plaintext, TLS or mutual TLS.

Files are checked here, when the server is built, so that a wrong path, an encrypted
key or a certificate that does not match its key stops ``serve`` with a clear message
instead of failing inside grpcio's TLS handshake later.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from domain.errors import ConfigurationError
from server.config import Settings, read_setting_file


def add_port(
    server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None
) -> int:
    """Bind ``listen``: TLS only when there are credentials, else plaintext."""
    if credentials is None:
        return server.add_insecure_port(listen)
    return server.add_secure_port(listen, credentials)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials; with ``tls_client_ca``, clients must present a certificate it signed."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    certificate_chain = read_setting_file("--tls-cert", settings.tls_cert)
    private_key = read_setting_file("--tls-key", settings.tls_key)
    _check_key_pair(settings.tls_cert, certificate_chain, settings.tls_key, private_key)
    client_ca = None
    if settings.tls_client_ca is not None:
        client_ca = read_setting_file("--tls-client-ca", settings.tls_client_ca)
        _certificates(f"--tls-client-ca {settings.tls_client_ca}", client_ca)
    return grpc.ssl_server_credentials(
        [(private_key, certificate_chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _certificates(setting: str, pem: bytes) -> list[x509.Certificate]:
    """The certificates in ``pem``; ``setting``: the flag and the file, for messages."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ConfigurationError(f"{setting}: no PEM certificate in it") from None


def _check_key_pair(cert_path: Path, chain: bytes, key_path: Path, key_pem: bytes) -> None:
    try:
        key = load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigurationError(
            f"--tls-key {key_path}: the private key is encrypted; give it unencrypted"
        ) from None
    except ValueError:
        raise ConfigurationError(f"--tls-key {key_path}: not a PEM private key") from None
    # The server's own certificate comes first in a chain file.
    leaf = _certificates(f"--tls-cert {cert_path}", chain)[0]
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise ConfigurationError(
            f"--tls-key {key_path} is not the private key of the certificate in"
            f" --tls-cert {cert_path}"
        )
    # Every client would refuse the handshake: say so now, not in each client's error.
    now = dt.datetime.now(dt.UTC)
    if leaf.not_valid_after_utc < now:
        raise ConfigurationError(
            f"--tls-cert {cert_path}: the certificate expired on"
            f" {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
    if leaf.not_valid_before_utc > now:
        raise ConfigurationError(
            f"--tls-cert {cert_path}: the certificate is not valid before"
            f" {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
        )


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
