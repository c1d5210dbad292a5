"""The README's grpcurl and buf curl examples, run for real against a live gateway."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from server.app import Gateway

README = Path(__file__).resolve().parents[2] / "README.md"


def try_it_script() -> str:
    text = README.read_text()
    block = re.search(
        r"<!-- try-it:start -->\s*```bash\n(.*?)```\s*<!-- try-it:end -->", text, re.S
    )
    assert block, "README lost its try-it block"
    return block.group(1)


async def test_readme_examples_work_against_a_running_gateway(
    gateway: Gateway, tmp_path: Path
) -> None:
    tools = Path(sys.executable).parent
    for tool in ("grpcurl", "buf"):
        if shutil.which(tool, path=str(tools)) is None:
            pytest.fail(f"{tool} is not installed in {tools} (scripts/setup-dev installs it)")
    script = try_it_script().replace("localhost:50051", f"127.0.0.1:{gateway.port}")
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    output = out.decode()
    assert process.returncode == 0, err.decode()
    assert "orders.v1.OrderCommandService" in output
    assert '"available_after": "100"' in output
    assert '"event_type": "OrderCreated"' in output
    assert '"correlation_id": "checkout-1"' in output
    # buf curl prints JSON names (camelCase), grpcurl the proto field names.
    assert '"eventType": "OrderCancelled"' in output
    assert '"availableAfter": "100"' in output.split("OrderCancelled", 1)[1]
    assert '"status": "SERVING"' in output
