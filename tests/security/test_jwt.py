"""JWT bearer tokens (``--jwt-public-key``), with keys generated here by ``cryptography``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from orders.v1 import (
    consumer_group_service_pb2,
    consumer_group_service_pb2_grpc,
    event_stream_service_pb2,
    event_stream_service_pb2_grpc,
    inventory_command_service_pb2_grpc,
    order_command_service_pb2_grpc,
)
from pydantic import ValidationError

from domain.ports import Commit, RecordedEvent
from server.app import Gateway, create_server
from server.config import Settings
from server.security.auth import AuthenticationError
from server.security.jwt import JwtAuthenticator
from server.stores.memory import MemoryEventStore
from tests.clients import Clients
from tests.group_support import group_gateway, join

ISSUER = "https://issuer.example"
AUDIENCE = "order-gateway"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Signer:
    key: PrivateKey
    algorithm: str

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)

    def token(self, algorithm: str | None = None, **overrides: Any) -> str:
        claims: dict[str, Any] = {
            "sub": "checkout-service",
            "scope": "orders:write inventory:write",
            "iss": ISSUER,
            "aud": AUDIENCE,
            "exp": int(time.time()) + 300,
        }
        claims.update(overrides)
        claims = {name: value for name, value in claims.items() if value is not None}
        return jwt.encode(claims, self.key, algorithm=algorithm or self.algorithm)


@pytest.fixture(scope="module")
def rsa_signer() -> Signer:
    return Signer(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


@pytest.fixture(scope="module")
def other_signer() -> Signer:
    """A key the gateway does not know."""
    return Signer(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


@pytest.fixture(scope="module")
def ec_signer() -> Signer:
    return Signer(ec.generate_private_key(ec.SECP256R1()), "ES256")


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


async def started(settings: Settings) -> Gateway:
    gateway = await create_server(settings, store=MemoryEventStore())
    await gateway.start()
    return gateway


@pytest.fixture
async def rsa_gateway(tmp_path: Path, rsa_signer: Signer) -> AsyncIterator[Gateway]:
    gateway = await started(
        Settings(
            listen="127.0.0.1:0",
            store="memory://",
            jwt_public_key=write(tmp_path / "jwt.pem", rsa_signer.public_pem()),
            jwt_issuer=ISSUER,
            jwt_audience=AUDIENCE,
        )
    )
    yield gateway
    await gateway.stop()


def clients_for(channel: grpc.aio.Channel) -> Clients:
    return Clients(
        channel=channel,
        orders=order_command_service_pb2_grpc.OrderCommandServiceStub(channel),
        inventory=inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel),
        events=event_stream_service_pb2_grpc.EventStreamServiceStub(channel),
    )


@pytest.fixture
async def api(rsa_gateway: Gateway) -> AsyncIterator[Clients]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{rsa_gateway.port}") as channel:
        yield clients_for(channel)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def restock_error(api: Clients, token: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.restock("sku-1", 1, metadata=bearer(token))
    return caught.value


@pytest.mark.parametrize("kind", ["rsa", "ec"])
async def test_a_valid_jwt_identifies_the_caller(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    signer: Signer = request.getfixturevalue(f"{kind}_signer")
    gateway = await started(
        Settings(
            listen="127.0.0.1:0",
            store="memory://",
            jwt_public_key=write(tmp_path / "jwt.pem", signer.public_pem()),
        )
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            api = clients_for(channel)
            # Without --jwt-issuer/--jwt-audience those claims are not checked.
            token = signer.token(iss="anyone", aud="anything")
            restocked = await api.restock("sku-1", 3, metadata=bearer(token))
            assert restocked[0].user_id == "checkout-service"
            assert signer.algorithm in {"RS256", "ES256"}
    finally:
        await gateway.stop()


async def test_the_scope_claim_grants_exactly_its_scopes(api: Clients, rsa_signer: Signer) -> None:
    restocked = await api.restock("sku-1", 3, metadata=bearer(rsa_signer.token()))
    assert restocked[0].user_id == "checkout-service"

    read_only = rsa_signer.token(scope="events:read")
    denied = await restock_error(api, read_only)
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    unscoped = await restock_error(api, rsa_signer.token(scope=None))
    assert unscoped.code() == grpc.StatusCode.PERMISSION_DENIED


def forged_hs256(public_pem: bytes) -> str:
    """The classic key-confusion attack: HMAC-sign with the server's public key as secret."""

    def part(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    header = part(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"sub": "attacker", "scope": "inventory:write", "exp": int(time.time()) + 300}
    signing_input = header + b"." + part(json.dumps(claims).encode())
    signature = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + part(signature)).decode()


@pytest.mark.parametrize(
    ("make_token", "message"),
    [
        (lambda s, o: s.token(exp=int(time.time()) - 120), "expired"),
        (lambda s, o: s.token(exp=None), "'exp' claim is missing"),
        (lambda s, o: s.token(exp=str(int(time.time()) + 600)), "'exp' claim must be a number"),
        (lambda s, o: s.token(nbf=str(int(time.time()) - 60)), "'nbf' claim must be a number"),
        (lambda s, o: s.token(nbf=int(time.time()) + 600), "not valid yet"),
        (lambda s, o: s.token(iss="https://evil.example"), "issuer"),
        (lambda s, o: s.token(iss=None), "'iss' claim is missing"),
        (lambda s, o: s.token(aud="another-service"), "audience"),
        (lambda s, o: s.token(aud=None), "'aud' claim is missing"),
        (lambda s, o: s.token(sub=None), "'sub' claim is missing"),
        (lambda s, o: s.token(sub="   "), "'sub' must be"),
        (lambda s, o: s.token(sub="evil\u0000user"), "'sub' must be"),
        (lambda s, o: s.token(sub="x" * 257), "'sub' must be"),
        (lambda s, o: s.token(sub="admin\u202e"), "'sub' must be"),
        (lambda s, o: s.token(sub="\u200b"), "'sub' must be"),
        (lambda s, o: s.token(sub="a\u2028b"), "'sub' must be"),
        (lambda s, o: s.token(scope=["inventory:write"]), "space-separated"),
        (lambda s, o: o.token(), "signature does not verify"),
        (lambda s, o: s.token(algorithm="RS384"), "algorithm is not accepted"),
        (lambda s, o: s.token(algorithm="PS256"), "algorithm is not accepted"),
        (lambda s, o: jwt.encode({"sub": "x", "exp": 2**40}, "", "none"), "algorithm"),
        (lambda s, o: forged_hs256(s.public_pem()), "algorithm is not accepted"),
        (lambda s, o: s.token()[:-4] + "AAAA", "signature does not verify"),
        (lambda s, o: s.token().rpartition(".")[0] + ".", "signature does not verify"),
        (lambda s, o: "e30.e30.e30", "algorithm is not accepted"),
        (lambda s, o: s.token().rpartition(".")[0], "malformed"),
        (lambda s, o: s.token().replace(".", ".!", 1), "malformed"),
    ],
    ids=[
        "expired",
        "no-exp",
        "string-exp",
        "string-nbf",
        "not-yet-valid",
        "wrong-issuer",
        "no-issuer",
        "wrong-audience",
        "no-audience",
        "no-sub",
        "blank-sub",
        "control-char-sub",
        "long-sub",
        "right-to-left-override-sub",
        "zero-width-sub",
        "line-separator-sub",
        "scope-list",
        "wrong-key",
        "rs384",
        "ps256",
        "alg-none",
        "hs256-key-confusion",
        "tampered-signature",
        "no-signature",
        "no-alg",
        "two-segments",
        "bad-base64",
    ],
)
async def test_a_jwt_that_fails_verification_is_unauthenticated(
    api: Clients, rsa_signer: Signer, other_signer: Signer, make_token: Any, message: str
) -> None:
    error = await restock_error(api, make_token(rsa_signer, other_signer))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (error.details() or "").startswith("invalid JWT: ")
    assert message in (error.details() or "")


async def test_an_es256_token_is_refused_by_an_rsa_key(api: Clients, ec_signer: Signer) -> None:
    error = await restock_error(api, ec_signer.token())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "algorithm is not accepted" in (error.details() or "")


async def test_a_token_that_is_no_jwt_is_unknown(api: Clients) -> None:
    error = await restock_error(api, "plain-opaque-token")
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "unknown bearer token"


async def test_a_stream_ends_when_the_token_that_opened_it_expires(
    api: Clients, rsa_signer: Signer
) -> None:
    # A token is checked as its call arrives: a Subscribe (or Consume) opened with it
    # went on delivering events long after its exp. Valid 2 s more (30 s of clock skew):
    short = rsa_signer.token(scope="events:read", exp=int(time.time()) - 28)
    lasting = rsa_signer.token(scope="events:read inventory:write")
    await api.restock("sku-1", 1, metadata=bearer(lasting))
    ending = api.events.Subscribe(
        event_stream_service_pb2.SubscribeRequest(), metadata=bearer(short)
    )
    going_on = api.events.Subscribe(
        event_stream_service_pb2.SubscribeRequest(), metadata=bearer(lasting)
    )
    try:
        async with asyncio.timeout(20):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in ending:
                    pass
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "expired" in (caught.value.details() or "")
            await api.restock("sku-1", 1, metadata=bearer(lasting))
            delivered = 0
            async for response in going_on:
                delivered += response.HasField("event")
                if delivered == 2:
                    break
    finally:
        going_on.cancel()


class _SlowToAnswerStore(MemoryEventStore):
    """Commits at once and reports it 3 s later, as a slow disk's commit would."""

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        recorded = await super().append(commit)
        await asyncio.sleep(3)
        return recorded


async def test_a_command_whose_token_expires_while_it_commits_is_answered(
    tmp_path: Path, rsa_signer: Signer
) -> None:
    # Only streams end when their token expires: a command cancelled so was answered
    # UNAUTHENTICATED although it had committed, and a client that took that answer
    # for a refusal (as it must) lost track of an order that stood.
    store = _SlowToAnswerStore()
    settings = Settings(
        listen="127.0.0.1:0",
        store="memory://",
        jwt_public_key=write(tmp_path / "jwt.pem", rsa_signer.public_pem()),
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
    )
    gateway = await create_server(settings, store=store)
    await gateway.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            api = clients_for(channel)
            # Valid 1 to 2 s more (30 s of clock skew).
            short = rsa_signer.token(scope="inventory:write", exp=int(time.time()) - 28)
            events = await api.restock("sku-1", 5, metadata=bearer(short))
    finally:
        await gateway.stop()
    assert [event.event_type for event in events] == ["ProductRestocked"]
    assert await store.find_command(events[0].command_id) is not None


async def test_a_consumer_group_member_ends_when_its_token_expires(
    tmp_path: Path, rsa_signer: Signer
) -> None:
    key = write(tmp_path / "jwt.pem", rsa_signer.public_pem())
    admin = rsa_signer.token(iss=None, aud=None, scope="events:admin")
    short = rsa_signer.token(iss=None, aud=None, scope="events:read", exp=int(time.time()) - 28)
    async with (
        group_gateway(jwt_public_key=key) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
    ):
        groups = consumer_group_service_pb2_grpc.ConsumerGroupServiceStub(channel)
        await groups.CreateConsumerGroup(
            consumer_group_service_pb2.CreateConsumerGroupRequest(name="g"), metadata=bearer(admin)
        )
        member = await join(groups, "g", metadata=bearer(short))
        try:
            async with asyncio.timeout(20):
                await member.ended.wait()
        finally:
            await member.close()
    assert member.error is not None
    assert member.error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_jwts_and_a_token_file_work_together(
    tmp_path: Path, rsa_signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    static = "static-service-token-42"
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        "[[token]]\n"
        f'sha256 = "{hashlib.sha256(static.encode()).hexdigest()}"\n'
        'user_id = "batch-job"\nscopes = ["inventory:write"]\n'
    )
    gateway = await started(
        Settings(
            listen="127.0.0.1:0",
            store="memory://",
            auth_tokens=tokens,
            jwt_public_key=write(tmp_path / "jwt.pem", rsa_signer.public_pem()),
        )
    )
    expired = rsa_signer.token(exp=int(time.time()) - 3600)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            api = clients_for(channel)
            by_file = await api.restock("sku-1", 1, metadata=bearer(static))
            by_jwt = await api.restock("sku-1", 1, metadata=bearer(rsa_signer.token()))
            assert [by_file[0].user_id, by_jwt[0].user_id] == ["batch-job", "checkout-service"]
            error = await restock_error(api, expired)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "expired" in (error.details() or "")
    finally:
        await gateway.stop()
    assert "invalid JWT" in caplog.text
    for secret in (static, expired, expired.split(".")[2]):
        assert secret not in caplog.text


def pem_of(key: Any) -> bytes:
    data: bytes = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return data


@pytest.mark.parametrize(
    ("make_pem", "message"),
    [
        (lambda: b"not a key", "not a PEM public key"),
        (
            lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
                Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
            ),
            "not a PEM public key",
        ),
        (lambda: pem_of(rsa.generate_private_key(65537, 1024)), "at least 2048"),
        (lambda: pem_of(ec.generate_private_key(ec.SECP384R1())), "P-256"),
        (lambda: pem_of(ed25519.Ed25519PrivateKey.generate()), "RSA (RS256) or EC P-256"),
    ],
    ids=["garbage", "private-key", "rsa-1024", "p-384", "ed25519"],
)
def test_an_unusable_key_file_is_refused_with_a_clear_message(
    tmp_path: Path, make_pem: Any, message: str
) -> None:
    path = write(tmp_path / "key.pem", make_pem())
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        JwtAuthenticator.from_file(path)
    # The setting and its file, as the operator named it.
    assert str(refused.value).startswith(f"--jwt-public-key {path}: ")


def test_issuer_and_audience_need_a_key() -> None:
    with pytest.raises(ValidationError, match="--jwt-public-key"):
        Settings(jwt_issuer=ISSUER)


@pytest.fixture(scope="module")
def verifier(rsa_signer: Signer) -> JwtAuthenticator:
    key = rsa_signer.key.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    return JwtAuthenticator(key, ISSUER, AUDIENCE)


def segment(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@settings(max_examples=300, deadline=None)
@given(
    token=st.one_of(
        st.text(),
        st.lists(
            st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789-_=."), max_size=4
        ).map(".".join),
        st.tuples(st.binary(max_size=64), st.binary(max_size=64), st.binary(max_size=64)).map(
            lambda parts: ".".join(segment(part) for part in parts)
        ),
        st.tuples(
            st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit", "b64"]), st.text()),
            st.dictionaries(st.text(max_size=5), st.integers() | st.text() | st.none()),
        ).map(
            lambda hc: ".".join(
                [segment(json.dumps(hc[0]).encode()), segment(json.dumps(hc[1]).encode()), "sig"]
            )
        ),
    )
)
def test_no_token_makes_the_jwt_check_fail_in_an_unexpected_way(
    verifier: JwtAuthenticator, token: str
) -> None:
    try:
        assert verifier.authenticate(token) is None
    except AuthenticationError as error:
        assert str(error).startswith("invalid JWT: ")


# -- tokens remembered once verified --------------------------------------------------


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens whose signature is checked (each call of ``jwt.decode``)."""
    checked: list[str] = []
    decode = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        checked.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return checked


def rsa_verifier(signer: Signer, remembered: int = 1_000) -> JwtAuthenticator:
    key = signer.key.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    return JwtAuthenticator(key, ISSUER, AUDIENCE, remembered=remembered)


def test_a_token_sent_again_is_not_verified_again(rsa_signer: Signer, decodes: list[str]) -> None:
    verifier = rsa_verifier(rsa_signer)
    token = rsa_signer.token()
    callers = [verifier.authenticate(token) for _ in range(5)]
    assert {caller.user_id for caller in callers if caller} == {"checkout-service"}
    assert decodes == [token]


def test_a_tampered_copy_of_a_remembered_token_is_still_refused(
    rsa_signer: Signer, decodes: list[str]
) -> None:
    verifier = rsa_verifier(rsa_signer)
    token = rsa_signer.token()
    assert verifier.authenticate(token) is not None
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        verifier.authenticate(token[:-4] + "AAAA")
    forged = rsa_signer.token(sub="someone-else").rpartition(".")[0] + "." + token.split(".")[2]
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        verifier.authenticate(forged)


def test_a_remembered_token_expires_when_a_verified_one_would(
    rsa_signer: Signer, decodes: list[str]
) -> None:
    verifier = rsa_verifier(rsa_signer)
    # From the start of a second, so that the first check has most of it to happen in.
    time.sleep(1.01 - time.time() % 1)
    second = int(time.time())
    # Expired 29 s ago: within the 30 s clock skew allowed, until the next whole second.
    token = rsa_signer.token(exp=second - 29)
    assert verifier.authenticate(token) is not None
    time.sleep(second + 1.05 - time.time())
    with pytest.raises(AuthenticationError, match="expired"):
        verifier.authenticate(token)
    assert decodes == [token, token]


def test_only_the_latest_tokens_are_remembered(rsa_signer: Signer, decodes: list[str]) -> None:
    verifier = rsa_verifier(rsa_signer, remembered=2)
    tokens = [rsa_signer.token(sub=f"service-{n}") for n in range(3)]
    for token in tokens + tokens[1:]:
        assert verifier.authenticate(token) is not None
    assert decodes == tokens  # the last two came from memory
    verifier.authenticate(tokens[0])
    assert decodes == [*tokens, tokens[0]]
