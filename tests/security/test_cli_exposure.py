"""Secure by default: ``serve`` without authentication stays on loopback unless --insecure."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import check_exposure, main
from server.config import Settings
from server.stores.urls import redacted_url

pytestmark = pytest.mark.usefixtures("keep_root_logger")


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "192.0.2.10:50051", "gateway:50051"])
def test_serve_refuses_a_public_address_without_authentication(
    listen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--listen", listen, "--store", "memory://"]) != 0
    error = capsys.readouterr().err
    assert "--insecure" in error
    assert listen in error


def test_the_environment_cannot_sneak_past_the_rule(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ORDER_GATEWAY_LISTEN", "0.0.0.0:0")
    assert main(["serve", "--store", "memory://"]) != 0
    assert "--insecure" in capsys.readouterr().err


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.8.9.10:1", "[::1]:0", "localhost:0"])
def test_loopback_needs_no_authentication(listen: str) -> None:
    check_exposure(Settings(listen=listen))


def test_authentication_or_insecure_allow_a_public_address(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text("")
    check_exposure(Settings(listen="0.0.0.0:50051", auth_tokens=tokens))
    check_exposure(Settings(listen="0.0.0.0:50051", jwt_public_key=tmp_path / "key.pem"))
    check_exposure(Settings(listen="0.0.0.0:50051", insecure=True))


def test_a_configuration_error_does_not_echo_the_store_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = "postgresql://gateway:s3cret-passw0rd@db.internal:5432/orders"
    assert main(["serve", "--store", store, "--tls-cert", "server.pem"]) == 2
    error = capsys.readouterr().err
    assert "--tls-cert and --tls-key must be given together" in error
    assert "s3cret-passw0rd" not in error


@pytest.mark.parametrize(
    ("flag", "content", "message"),
    [
        ("--jwt-public-key", b"not a key", "not a PEM public key"),
        ("--auth-tokens", b'[[token]]\nuser_id = "a"\n', "needs sha256"),
    ],
)
def test_serve_stops_on_an_unusable_credentials_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, content: bytes, message: str
) -> None:
    path = tmp_path / "credentials"
    path.write_bytes(content)
    assert main(["serve", "--listen", "127.0.0.1:0", "--store", "memory://", flag, str(path)]) == 2
    error = capsys.readouterr().err
    assert str(path) in error
    assert message in error


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("postgresql://gw:s3cret@db:5432/orders", "postgresql://gw:***@db:5432/orders"),
        ("postgresql://gw@db/orders", "postgresql://gw@db/orders"),
        ("sqlite:///order-gateway.db", "sqlite:///order-gateway.db"),
        (
            "postgresql://gw@db/orders?password=s3cret&sslmode=require",
            "postgresql://gw@db/orders?password=***&sslmode=require",
        ),
        (
            "postgresql:///orders?host=db&sslpassword=k3y&password=s3cret",
            "postgresql:///orders?host=db&sslpassword=***&password=***",
        ),
        (
            "postgresql://gw:s3cret@db/orders?application_name=gw",
            "postgresql://gw:***@db/orders?application_name=gw",
        ),
        # libpq's keyword/value form, which the gateway does not take, is still reported.
        ("host=db password=s3cret dbname=orders", "host=db password=*** dbname=orders"),
        ("host=db PASSWORD = 's3 cr\\'et' user=gw", "host=db PASSWORD = *** user=gw"),
        ("sslpassword=k3y host=db", "sslpassword=*** host=db"),
    ],
)
def test_store_urls_are_logged_without_their_password(url: str, logged: str) -> None:
    assert redacted_url(url) == logged


def test_an_unsupported_store_url_is_reported_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = "mysql://gw:s3cret@db/orders?password=0ther"
    assert main(["serve", "--listen", "127.0.0.1:0", "--store", url]) == 2
    error = capsys.readouterr().err
    assert "unsupported store URL 'mysql://gw:***@db/orders?password=***'" in error
    assert "s3cret" not in error
    assert "0ther" not in error


def test_an_unsupported_keyword_value_store_string_is_reported_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--listen", "127.0.0.1:0", "--store", "host=h password=S3CRETPW"]) == 2
    error = capsys.readouterr().err
    assert "unsupported store URL 'host=h password=***'" in error
    assert "S3CRETPW" not in error
