"""The README's grpcurl and buf curl examples, run for real against a live gateway."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from server.app import Gateway, create_server
from server.config import Settings
from server.stores.memory import MemoryEventStore

README = Path(__file__).resolve().parents[2] / "README.md"
TOOLS = Path(sys.executable).parent


def readme_block(name: str) -> str:
    """The bash block between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``."""
    text = README.read_text()
    block = re.search(
        rf"<!-- {name}:start -->\s*```bash\n(.*?)```\s*<!-- {name}:end -->", text, re.S
    )
    assert block, f"README lost its {name} block"
    return block.group(1)


async def run_bash(script: str, cwd: Path, port: int) -> str:
    """Run ``script`` as the README's reader would, against the gateway on ``port``."""
    for tool in ("grpcurl", "buf"):
        if shutil.which(tool, path=str(TOOLS)) is None:
            pytest.fail(f"{tool} is not installed in {TOOLS} (scripts/setup-dev installs it)")
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script.replace("localhost:50051", f"127.0.0.1:{port}"),
        cwd=cwd,
        env={**os.environ, "PATH": f"{TOOLS}:{os.environ['PATH']}"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_readme_examples_work_against_a_running_gateway(
    gateway: Gateway, tmp_path: Path
) -> None:
    output = await run_bash(readme_block("try-it"), tmp_path, gateway.port)
    assert "orders.v1.OrderCommandService" in output
    assert '"available_after": "100"' in output
    assert '"event_type": "OrderCreated"' in output
    assert '"correlation_id": "checkout-1"' in output
    # buf curl prints JSON names (camelCase), grpcurl the proto field names.
    assert '"eventType": "OrderCancelled"' in output
    assert '"availableAfter": "100"' in output.split("OrderCancelled", 1)[1]
    assert '"status": "SERVING"' in output


async def test_readme_token_example_authenticates_the_caller(tmp_path: Path) -> None:
    # The setup block makes the token and its file; the gateway it describes is started
    # here on a free port, with that file; the calls block then uses the same token.
    await run_bash(readme_block("auth-setup") + 'printf %s "$TOKEN" > token\n', tmp_path, 0)
    settings = Settings(
        listen="127.0.0.1:0", store="memory://", auth_tokens=tmp_path / "tokens.toml"
    )
    gateway = await create_server(settings, store=MemoryEventStore())
    await gateway.start()
    try:
        calls = "TOKEN=$(cat token)\n" + readme_block("auth-calls")
        output = await run_bash(calls, tmp_path, gateway.port)
        assert '"event_type": "ProductRestocked"' in output
        assert '"user_id": "checkout-service"' in output
        # The same call without the token is refused: authentication is really on.
        anonymous = calls.replace('-H "authorization: Bearer $TOKEN" ', "")
        assert anonymous != calls
        with pytest.raises(AssertionError, match="Unauthenticated"):
            await run_bash(anonymous, tmp_path, gateway.port)
    finally:
        await gateway.stop()
