"""The Dockerfile, .dockerignore and compose.yaml, checked by parsing them (this machine
cannot build images), and the health check command the image runs, against a real gateway."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.client.health import check_health, local_target
from server.security.identity import ALL_SCOPES
from tests.observability_support import running

ROOT = Path(__file__).resolve().parents[2]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            found.append((keyword.upper(), " ".join(arguments.split())))
    return found


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(n for n, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(ROOT / "Dockerfile")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def test_image_is_slim_python_311_and_runs_as_a_numeric_non_root_user(
    dockerfile: list[tuple[str, str]],
) -> None:
    bases = [arguments.split()[0] for keyword, arguments in dockerfile if keyword == "FROM"]
    assert bases and all(base == "python:3.11-slim" for base in bases)
    users = [arguments for keyword, arguments in final_stage(dockerfile) if keyword == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0


def test_image_installs_the_package_and_runs_serve(dockerfile: list[tuple[str, str]]) -> None:
    runs = " ".join(arguments for keyword, arguments in dockerfile if keyword == "RUN")
    assert re.search(r"pip install \S*\"\.", runs), "the image must `pip install .`"
    stage = dict(final_stage(dockerfile))
    assert stage["ENTRYPOINT"] == '["order-gateway"]'
    assert stage["CMD"] == '["serve"]'
    assert "50051" in stage["EXPOSE"].split()
    assert "ORDER_GATEWAY_LISTEN=0.0.0.0:50051" in stage["ENV"].split()


def test_healthcheck_asks_the_grpc_health_service(dockerfile: list[tuple[str, str]]) -> None:
    (healthcheck,) = [a for k, a in final_stage(dockerfile) if k == "HEALTHCHECK"]
    options, _, command = healthcheck.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    assert command.startswith('["order-gateway", "health"')


def test_dockerignore_admits_only_what_the_build_copies(dockerfile: list[tuple[str, str]]) -> None:
    patterns = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allow-list: nothing unexpected enters the build context"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        source.rstrip("/")
        for keyword, arguments in dockerfile
        if keyword == "COPY" and not arguments.startswith("--from")
        for source in shlex.split(arguments)[:-1]
    }
    assert copied == allowed
    assert {".venv", ".git"}.isdisjoint(allowed)


def test_compose_runs_two_gateways_on_the_postgres_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateways = {name: s for name, s in services.items() if s.get("image") == "order-gateway:local"}
    replicas = {name for name, s in gateways.items() if s.get("command") is None}
    assert len(replicas) == 2
    assert services["postgres"]["image"].startswith("postgres:")
    for name in replicas:
        service = gateways[name]
        store = service["environment"]["ORDER_GATEWAY_STORE"]
        assert re.fullmatch(r"postgresql://[^@]+@postgres:5432/\w+", store), store
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        # They listen on 0.0.0.0 (the image's default): never without authentication.
        assert "ORDER_GATEWAY_AUTH_TOKENS" in service["environment"]
        assert "ORDER_GATEWAY_INSECURE" not in service["environment"]
    published = [port for name in replicas for port in gateways[name]["ports"]]
    assert all(port.startswith("127.0.0.1:") for port in published)
    assert len({port.rsplit(":", 1)[0] for port in published}) == len(published)


def test_every_long_running_compose_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if service.get("restart") == "no":
            continue
        assert service["healthcheck"]["test"], f"{name} has no healthcheck"
    replica = compose["services"]["gateway-1"]
    assert replica["healthcheck"]["test"][:3] == ["CMD", "order-gateway", "health"]


def test_compose_token_file_is_valid_and_holds_only_a_hash(compose: dict[str, Any]) -> None:
    document = tomllib.loads(compose["configs"]["tokens"]["content"])
    (token,) = document["token"]
    assert token["sha256"] == hashlib.sha256(b"dev-token-change-me").hexdigest()
    assert "dev-token-change-me" not in compose["configs"]["tokens"]["content"]
    # The development token tries out every RPC, consumer groups' administration included.
    assert set(token["scopes"]) == ALL_SCOPES


@pytest.mark.parametrize(
    ("listen", "target"),
    [
        ("0.0.0.0:50051", "127.0.0.1:50051"),
        ("[::]:50051", "[::1]:50051"),
        ("10.1.2.3:7000", "10.1.2.3:7000"),
        ("localhost:50051", "localhost:50051"),
    ],
)
def test_health_check_reaches_the_listen_port_locally(listen: str, target: str) -> None:
    assert local_target(listen) == target


async def test_health_check_passes_while_serving_and_fails_after_stop(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with running() as (gateway, _):
        target = f"127.0.0.1:{gateway.port}"
        assert await asyncio.to_thread(check_health, target, "", 5) == 0
        assert "SERVING" in capsys.readouterr().out
    # Stopped: nothing listens any more.
    assert await asyncio.to_thread(check_health, target, "", 2) == 1


async def test_health_check_fails_once_shutdown_begins() -> None:
    async with running() as (gateway, _):
        target = f"127.0.0.1:{gateway.port}"
        await gateway.health.enter_graceful_shutdown()
        assert await asyncio.to_thread(check_health, target, "", 5) == 1
