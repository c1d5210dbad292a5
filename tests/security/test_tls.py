"""TLS and mutual TLS, with a CA and certificates generated here by ``cryptography``."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from orders.v1 import inventory_command_service_pb2, inventory_command_service_pb2_grpc
from pydantic import ValidationError

from domain.errors import ConfigurationError
from server.app import Gateway, create_server
from server.config import Settings
from server.stores.memory import MemoryEventStore
from tests.serving import free_port

CALL_TIMEOUT = 10


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(Encoding.PEM)


def issue(
    name: str,
    issuer: Issued | None = None,
    *,
    ca: bool = False,
    client: bool = False,
    valid_from: dt.timedelta = -dt.timedelta(minutes=5),
    valid_until: dt.timedelta = dt.timedelta(days=1),
    key: ec.EllipticCurvePrivateKey | None = None,
    server_names: Sequence[x509.GeneralName] = (
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ),
) -> Issued:
    """A certificate for ``name``, signed by ``issuer`` (self-signed when None), valid
    from ``valid_from`` to ``valid_until`` after now (of a new key, unless ``key``); a
    server's holds ``server_names``."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + valid_from)
        .not_valid_after(now + valid_until)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if not client:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(list(server_names)), critical=False
            )
    signer = issuer.key if issuer else key
    return Issued(key, builder.sign(signer, hashes.SHA256()))


@dataclass(frozen=True)
class Pki:
    server_ca: Issued
    server: Issued
    client_ca: Issued
    client: Issued
    stranger: Issued
    """A client certificate that no configured CA signed."""


@pytest.fixture(scope="module")
def pki() -> Pki:
    server_ca = issue("test server CA", ca=True)
    client_ca = issue("test client CA", ca=True)
    return Pki(
        server_ca=server_ca,
        server=issue("localhost", server_ca),
        client_ca=client_ca,
        client=issue("checkout-service", client_ca, client=True),
        stranger=issue("stranger", issue("rogue CA", ca=True), client=True),
    )


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def tls_settings(tmp_path: Path, pki: Pki, *, mutual: bool = False) -> Settings:
    return Settings(
        listen="127.0.0.1:0",
        store="memory://",
        tls_cert=write(tmp_path / "server.pem", pki.server.cert_pem + pki.server_ca.cert_pem),
        tls_key=write(tmp_path / "server.key", pki.server.key_pem),
        tls_client_ca=write(tmp_path / "clients.pem", pki.client_ca.cert_pem) if mutual else None,
    )


async def started(settings: Settings) -> AsyncIterator[Gateway]:
    gateway = await create_server(settings, store=MemoryEventStore())
    await gateway.start()
    yield gateway
    await gateway.stop()


@pytest.fixture
async def tls_gateway(tmp_path: Path, pki: Pki) -> AsyncIterator[Gateway]:
    async for gateway in started(tls_settings(tmp_path, pki)):
        yield gateway


@pytest.fixture
async def mtls_gateway(tmp_path: Path, pki: Pki) -> AsyncIterator[Gateway]:
    async for gateway in started(tls_settings(tmp_path, pki, mutual=True)):
        yield gateway


async def restock(channel: grpc.aio.Channel) -> str:
    stub = inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel)
    request = inventory_command_service_pb2.RestockProductRequest(product_id="sku-1", quantity=1)
    responses = [r async for r in stub.RestockProduct(request, timeout=CALL_TIMEOUT)]
    return responses[0].event.event_type


async def health_code(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def secure(port: int, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    # A private subchannel pool: every test channel makes its own TLS handshake.
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.use_local_subchannel_pool", 1)]
    )


async def test_a_tls_client_is_served(tls_gateway: Gateway, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.server_ca.cert_pem)
    async with secure(tls_gateway.port, credentials) as channel:
        assert await restock(channel) == "ProductRestocked"


async def test_a_plaintext_client_gets_no_answer_from_a_tls_server(tls_gateway: Gateway) -> None:
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_gateway.port}", options) as channel:
        assert await health_code(channel) == grpc.StatusCode.UNAVAILABLE


async def test_a_client_that_does_not_trust_the_server_ca_refuses(
    tls_gateway: Gateway, pki: Pki
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.client_ca.cert_pem)
    async with secure(tls_gateway.port, credentials) as channel:
        assert await health_code(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_serves_a_client_certificate_from_the_ca(
    mtls_gateway: Gateway, pki: Pki
) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.server_ca.cert_pem,
        private_key=pki.client.key_pem,
        certificate_chain=pki.client.cert_pem,
    )
    async with secure(mtls_gateway.port, credentials) as channel:
        assert await restock(channel) == "ProductRestocked"


async def test_mutual_tls_refuses_a_client_without_a_certificate(
    mtls_gateway: Gateway, pki: Pki
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.server_ca.cert_pem)
    async with secure(mtls_gateway.port, credentials) as channel:
        assert await health_code(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_a_certificate_from_another_ca(
    mtls_gateway: Gateway, pki: Pki
) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.server_ca.cert_pem,
        private_key=pki.stranger.key_pem,
        certificate_chain=pki.stranger.cert_pem,
    )
    async with secure(mtls_gateway.port, credentials) as channel:
        assert await health_code(channel) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "given",
    [{"tls_cert": "server.pem"}, {"tls_key": "server.key"}, {"tls_client_ca": "clients.pem"}],
    ids=["cert-alone", "key-alone", "client-ca-alone"],
)
def test_tls_files_must_come_together(given: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="--tls-"):
        Settings(**given)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        # Each names the setting and its file.
        ("foreign-key", "^--tls-key .* is not the private key of the certificate in --tls-cert "),
        ("encrypted-key", "^--tls-key .*: the private key is encrypted"),
        ("garbage-key", "^--tls-key .*: not a PEM private key"),
        ("garbage-cert", "^--tls-cert .*: no PEM certificate"),
        ("garbage-client-ca", "^--tls-client-ca .*: no PEM certificate"),
        ("expired-cert", "^--tls-cert .*: the certificate expired on "),
        ("future-cert", "^--tls-cert .*: the certificate is not valid before "),
    ],
)
async def test_unusable_tls_files_stop_the_server_with_a_clear_message(
    tmp_path: Path, pki: Pki, case: str, message: str
) -> None:
    cert, key, client_ca = pki.server.cert_pem, pki.server.key_pem, pki.client_ca.cert_pem
    if case == "foreign-key":
        key = pki.client.key_pem
    elif case == "encrypted-key":
        key = pki.server.key.private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"passphrase")
        )
    elif case == "garbage-key":
        key = b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"
    elif case == "garbage-cert":
        cert = b"not a certificate"
    elif case in ("expired-cert", "future-cert"):
        # The server's own key, so that only the dates are wrong.
        window = (
            (-dt.timedelta(days=2), -dt.timedelta(days=1))
            if case == "expired-cert"
            else (dt.timedelta(days=1), dt.timedelta(days=2))
        )
        cert = issue(
            "localhost",
            pki.server_ca,
            valid_from=window[0],
            valid_until=window[1],
            key=pki.server.key,
        ).cert_pem
    else:
        client_ca = b""
    settings = Settings(
        listen="127.0.0.1:0",
        store="memory://",
        tls_cert=write(tmp_path / "server.pem", cert),
        tls_key=write(tmp_path / "server.key", key),
        tls_client_ca=write(tmp_path / "clients.pem", client_ca),
    )
    with pytest.raises(ValueError, match=message):
        await create_server(settings, store=MemoryEventStore())


async def test_a_missing_tls_file_is_named(tmp_path: Path) -> None:
    settings = Settings(
        listen="127.0.0.1:0",
        store="memory://",
        tls_cert=tmp_path / "absent.pem",
        tls_key=tmp_path / "absent.key",
    )
    with pytest.raises(
        ConfigurationError,
        match=r"^--tls-cert \(ORDER_GATEWAY_TLS_CERT\) .*absent\.pem: No such file",
    ):
        await create_server(settings, store=MemoryEventStore())


async def test_a_failed_handshake_leaves_no_line_outside_the_log_format(
    tmp_path: Path, pki: Pki
) -> None:
    # grpc writes a line of its own (its format, its level) for each failed TLS handshake,
    # which any client can cause: only grpc's errors reach stderr, unless the operator
    # sets GRPC_VERBOSITY. This process has it set: the gateway must choose it itself.
    port = free_port()
    settings = tls_settings(tmp_path, pki)
    env = {name: value for name, value in os.environ.items() if name != "GRPC_VERBOSITY"}
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "serve", "--listen", f"127.0.0.1:{port}",
        "--store", "memory://", "--log-format", "json",
        "--tls-cert", str(settings.tls_cert), "--tls-key", str(settings.tls_key),
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert gateway.stderr is not None
    try:
        async with asyncio.timeout(30):
            first = (await gateway.stderr.readline()).decode()
        assert "listening on" in first, first
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await health_code(channel) == grpc.StatusCode.UNAVAILABLE
    finally:
        gateway.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            _, rest = await gateway.communicate()
    lines = [first, *rest.decode().splitlines()]
    assert gateway.returncode == 0
    assert all(json.loads(line)["level"] == "INFO" for line in lines), lines
