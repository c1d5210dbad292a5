"""``order-gateway group …``, ``consume``, and the client flags (--token, --tls-ca) that
``tail`` shares with them: the real CLI, in a process of its own, against a real gateway."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import pytest
from cryptography import x509
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc
from orders.v1 import inventory_command_service_pb2 as inventory_pb
from orders.v1 import inventory_command_service_pb2_grpc as inventory_grpc

from server.app import Gateway
from server.client.channel import connection_settles, quiet_polling_of_closed_channels
from server.client.ctrl_c import ctrl_c_stops
from server.client.groups import follow_group
from server.client.tail import follow
from server.stores.factory import open_store
from tests.e2e.test_early_stop import catches
from tests.group_support import group_gateway, member
from tests.security.test_tls import issue, write
from tests.serving import free_port


@dataclass
class Outcome:
    code: int | None
    out: str
    err: str

    @property
    def lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.out.splitlines()]


async def cli(*args: str, env: dict[str, str] | None = None) -> Outcome:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return Outcome(process.returncode, out.decode(), err.decode())


async def restock(gateway: Gateway, count: int) -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = inventory_grpc.InventoryCommandServiceStub(channel)
        ids = []
        for n in range(count):
            request = inventory_pb.RestockProductRequest(product_id=f"p{n}", quantity=1)
            ids += [r.event.event_id async for r in stub.RestockProduct(request)]
        return ids


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    async with group_gateway() as started:
        yield started


async def test_group_commands_round_trip(gateway: Gateway) -> None:
    target = f"127.0.0.1:{gateway.port}"
    created = await cli(
        "group", "create", "billing", "--partitions", "4", "--type", "OrderCreated",
        "--ack-timeout", "2.5", "--max-deliveries", "3", "--target", target,
    )  # fmt: skip
    assert created.code == 0, created.err
    (group,) = created.lines
    assert group["name"] == "billing"
    # The proto field names, as grpcurl and the docs have them, zero values included.
    assert group["settings"] == {
        "event_types": ["OrderCreated"],
        "start_after_position": "0",
        "start_from_end": False,
        "partitions": 4,
        "ack_timeout": "2.500s",
        "max_deliveries": 3,
    }
    await cli("group", "create", "audit", "--from-end", "--target", target)
    listed = await cli("group", "list", "--target", target)
    assert [g["name"] for g in listed.lines] == ["audit", "billing"]
    info = await cli("group", "info", "billing", "--target", target)
    assert info.lines[0]["partition_states"][0] == {  # type: ignore[index]
        "partition": 0,
        "checkpoint": "0",
        "member_id": "",
        "in_flight": 0,
    }
    # In field order, as grpcurl prints them, zero values included.
    assert '"partition_states": [{"partition": 0, "checkpoint": "0",' in info.out
    assert list(info.lines[0]) == [field.name for field in pb.ConsumerGroup.DESCRIPTOR.fields]
    assert len(info.lines[0]["partition_states"]) == 4  # type: ignore[arg-type]
    replayed = await cli("group", "replay-parked", "billing", "--limit", "5", "--target", target)
    assert replayed.code == 0 and replayed.lines == [{"replayed": "0"}]
    deleted = await cli("group", "delete", "billing", "--target", target)
    # A confirmation, as one JSON line like every other group subcommand's answer.
    assert deleted.code == 0 and deleted.lines == [{"deleted": "billing"}], deleted
    gone = await cli("group", "info", "billing", "--target", target)
    assert gone.code == 1
    assert "NOT_FOUND" in gone.err


async def _many_groups(
    request: pb.ListConsumerGroupsRequest, context: grpc.aio.ServicerContext[object, object]
) -> pb.ListConsumerGroupsResponse:
    """More than gRPC clients accept by default (4 MiB), all at once, as a gateway that
    does not page the list answers when it has a few thousand groups of 256 partitions."""
    types = [f"Type{n:045d}" for n in range(100)]  # 5 KB of settings per group
    return pb.ListConsumerGroupsResponse(
        groups=[
            pb.ConsumerGroup(name=f"g{n}", settings=pb.ConsumerGroupSettings(event_types=types))
            for n in range(1000)
        ]
    )


ListGroups = Callable[
    [pb.ListConsumerGroupsRequest, grpc.aio.ServicerContext[object, object]],
    Awaitable[pb.ListConsumerGroupsResponse],
]


async def group_list_from(list_groups: ListGroups) -> Outcome:
    """``group list`` from a server that answers ListConsumerGroups with ``list_groups``."""
    server = grpc.aio.server()
    listing = grpc.unary_unary_rpc_method_handler(
        list_groups,
        request_deserializer=pb.ListConsumerGroupsRequest.FromString,
        response_serializer=pb.ListConsumerGroupsResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "orders.v1.ConsumerGroupService", {"ListConsumerGroups": listing}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return await cli("group", "list", "--target", f"127.0.0.1:{port}")
    finally:
        await server.stop(None)


async def test_group_list_reads_an_answer_beyond_grpc_s_default_receive_limit() -> None:
    listed = await group_list_from(_many_groups)
    assert listed.code == 0, listed.err
    assert len(listed.lines) == 1000
    assert len(listed.out) > 4 * 1024 * 1024


async def test_group_list_asks_for_the_groups_a_page_at_a_time() -> None:
    names = [f"g{n:03d}" for n in range(250)]
    asked: list[tuple[int, str]] = []

    async def paged(
        request: pb.ListConsumerGroupsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ListConsumerGroupsResponse:
        asked.append((request.page_size, request.page_token))
        start = int(request.page_token or "0")
        end = start + request.page_size
        return pb.ListConsumerGroupsResponse(
            groups=[pb.ConsumerGroup(name=name) for name in names[start:end]],
            next_page_token=str(end) if end < len(names) else "",
        )

    listed = await group_list_from(paged)
    assert listed.code == 0, listed.err
    assert [line["name"] for line in listed.lines] == names
    assert asked == [(100, ""), (100, "100"), (100, "200")]


async def test_group_create_reports_every_bad_field(gateway: Gateway) -> None:
    refused = await cli(
        "group", "create", "no spaces", "--partitions", "300", "--type", "Nope",
        "--target", f"127.0.0.1:{gateway.port}",
    )  # fmt: skip
    assert refused.code == 1
    assert "INVALID_ARGUMENT" in refused.err
    for field in ("name", "settings.partitions", "settings.event_types[0]"):
        assert f"  {field}: " in refused.err
    negative = await cli("group", "create", "g", "--partitions", "-1")
    assert negative.code == 2
    # Numbers their proto fields cannot hold are usage errors naming the flag.
    for command in (
        ("create", "g", "--partitions", str(2**32)),
        ("create", "g", "--max-deliveries", str(2**32)),
        ("create", "g", "--after", str(2**64)),
        ("replay-parked", "g", "--limit", str(2**32)),
    ):
        unencodable = await cli("group", *command)
        assert unencodable.code == 2, unencodable.err
        assert command[2] in unencodable.err
        assert "Traceback" not in unencodable.err
    # Seconds that no Duration can hold are a usage error, not a stack trace.
    for seconds in ("inf", "nan", "1e300"):
        unencodable = await cli("group", "create", "g", "--ack-timeout", seconds)
        assert unencodable.code == 2, unencodable.err
        assert "--ack-timeout" in unencodable.err
        assert "Traceback" not in unencodable.err


async def test_consume_prints_json_lines_and_acks_each(gateway: Gateway) -> None:
    target = f"127.0.0.1:{gateway.port}"
    await cli("group", "create", "g", "--target", target)
    ids = await restock(gateway, 3)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "consume", "--group", "g", "--member", "cli-1",
        "--target", target,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    lines = [json.loads(await asyncio.wait_for(process.stdout.readline(), 30)) for _ in ids]
    assert sorted(line["event"]["event_id"] for line in lines) == sorted(ids)
    assert {line["attempt"] for line in lines} == {1}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        async with asyncio.timeout(10):
            while True:
                group = (await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))).group
                if group.checkpoint == group.head_position == 3 and group.in_flight == 0:
                    break
                await asyncio.sleep(0.05)
        assert [m.member_id for m in group.members] == ["cli-1"]
    process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(process.wait(), 30) == 0
    err = (await process.stderr.read()).decode()
    assert "member cli-1 has partitions 0, 1, 2" in err


@pytest.mark.postgres
async def test_consume_on_postgresql_says_its_partitions_are_yet_to_come_not_standby(
    fresh_postgres_url: str,
) -> None:
    # The gateway answers the join with an Assignment naming no partition, before the
    # group's partitions are shared out; the member's follow at once. That first one was
    # printed as "none (standby)", which the member never was.
    async with group_gateway(store=await open_store(fresh_postgres_url)) as gateway:
        target = f"127.0.0.1:{gateway.port}"
        await cli("group", "create", "g", "--partitions", "3", "--target", target)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "consume", "--group", "g", "--member", "cli-1",
            "--target", target,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stderr is not None
        try:
            lines = [
                (await asyncio.wait_for(process.stderr.readline(), 30)).decode().rstrip("\n")
                for _ in range(2)
            ]
        finally:
            process.send_signal(signal.SIGINT)
            await asyncio.wait_for(process.wait(), 30)
    assert lines == [
        "order-gateway consume: member cli-1 has partitions none yet",
        "order-gateway consume: member cli-1 has partitions 0, 1, 2",
    ]


async def consume_first_lines(target: str) -> tuple[list[bytes], str]:
    """``consume --group g | head -1``: the lines in the first read of the pipe (as
    ``head`` reads, a buffer at a time, then goes away), once ``consume`` has exited 0
    (which it must), and what it wrote to stderr."""
    read_end, write_end = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "consume", "--group", "g", "--member", "cli-1",
            "--target", target,
            stdout=write_end, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(write_end)
    try:
        chunk = await asyncio.wait_for(asyncio.to_thread(os.read, read_end, 65536), 30)
    finally:
        os.close(read_end)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err
    return chunk.splitlines(), err.decode()


async def test_consume_stops_with_0_when_its_reader_goes_away_on_a_quiet_group(
    gateway: Gateway,
) -> None:
    """As `consume | head -1` when nothing more comes: it leaves the group at once rather
    than holding its partitions until an event comes to fail to write."""
    target = f"127.0.0.1:{gateway.port}"
    await cli("group", "create", "g", "--target", target)
    await restock(gateway, 1)
    lines, err = await consume_first_lines(target)
    assert json.loads(lines[0])["attempt"] == 1
    assert "Traceback" not in err
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        group = (await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))).group
    assert list(group.members) == []


async def test_consume_whose_reader_goes_away_sends_its_acks_and_leaves(
    gateway: Gateway,
) -> None:
    """As `consume | head -1` while events come: the acks of the lines it wrote reach the
    server before the member leaves. Cancelled at once, the call dropped the acks still
    queued, and those events, consumed, came back (and were parked in the end)."""
    target = f"127.0.0.1:{gateway.port}"
    await cli("group", "create", "g", "--partitions", "1", "--target", target)
    await restock(gateway, 50)
    lines, _ = await consume_first_lines(target)
    read = {json.loads(line)["event"]["event_id"] for line in lines if line.endswith(b"}")}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        group = (await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))).group
        assert list(group.members) == []
        assert group.checkpoint >= 1
        async with member(stub, "g", member_id="next") as next_member:
            again: list[pb.Delivery] = []
            with contextlib.suppress(TimeoutError):
                while True:
                    delivery = await next_member.delivery(within=1)
                    again.append(delivery)
                    await next_member.ack(delivery.event.event_id)
    # What it wrote is done; only what it had not written comes back.
    assert not read & {delivery.event.event_id for delivery in again}
    assert group.checkpoint + len(again) == 50


async def test_repeated_consume_into_head_parks_nothing(gateway: Gateway) -> None:
    """`consume | head -1`, again and again: each run fails only the one delivery it had
    received and not written (a departure is a failed attempt), never a whole window of
    them, so no event reaches max_deliveries and is parked unseen."""
    target = f"127.0.0.1:{gateway.port}"
    await cli(
        "group", "create", "g", "--partitions", "1", "--max-deliveries", "2", "--target", target
    )
    await restock(gateway, 20)
    for _ in range(4):
        await consume_first_lines(target)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        group = (await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))).group
    assert group.parked == 0
    assert group.checkpoint >= 4


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_consume_stops_with_exit_1_when_its_output_cannot_be_written(
    gateway: Gateway,
) -> None:
    target = f"127.0.0.1:{gateway.port}"
    await cli("group", "create", "g", "--target", target)
    await restock(gateway, 1)
    full = os.open("/dev/full", os.O_WRONLY)  # every write fails: no space left
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "consume", "--group", "g", "--target", target,
            stdout=full, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(full)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert err.decode().splitlines()[-1] == (
        "order-gateway consume: cannot write the events: No space left on device"
    )
    # Not written, so not acked: the event is still the group's to deliver.
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        group = (await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="g"))).group
    assert (group.checkpoint, group.head_position) == (0, 1)


async def test_consume_an_unknown_group_fails_with_its_reason(gateway: Gateway) -> None:
    refused = await cli("consume", "--group", "nope", "--target", f"127.0.0.1:{gateway.port}")
    assert refused.code == 1
    assert "NOT_FOUND" in refused.err


async def test_token_from_the_flag_or_the_environment(tmp_path: Path) -> None:
    reader = hashlib.sha256(b"secret-reader").hexdigest()
    writer = hashlib.sha256(b"secret-writer").hexdigest()
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[token]]\nsha256 = "{reader}"\nuser_id = "ops"\n'
        'scopes = ["events:read", "events:admin"]\n'
        f'[[token]]\nsha256 = "{writer}"\nuser_id = "shop"\nscopes = ["inventory:write"]\n'
    )
    async with group_gateway(auth_tokens=tokens) as gateway:
        target = f"127.0.0.1:{gateway.port}"
        refused = await cli("group", "list", "--target", target)
        assert refused.code == 1 and "UNAUTHENTICATED" in refused.err
        by_flag = await cli("group", "create", "g", "--target", target, "--token", "secret-reader")
        assert by_flag.code == 0, by_flag.err
        by_env = await cli(
            "group", "list", "--target", target, env={"ORDER_GATEWAY_TOKEN": "secret-reader"}
        )
        assert [g["name"] for g in by_env.lines] == ["g"]
        # tail takes the same flags; with the token it is served (and runs until stopped).
        async with grpc.aio.insecure_channel(target) as channel:
            stub = inventory_grpc.InventoryCommandServiceStub(channel)
            request = inventory_pb.RestockProductRequest(product_id="p", quantity=1)
            metadata = (("authorization", "Bearer secret-writer"),)
            async for _ in stub.RestockProduct(request, metadata=metadata):
                pass
        tailing = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "tail", "--target", target,
            "--token", "secret-reader",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert tailing.stdout is not None
        line = await asyncio.wait_for(tailing.stdout.readline(), 30)
        assert json.loads(line)["event_type"] == "ProductRestocked"
        tailing.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(tailing.wait(), 30) == 0


async def test_tls_ca_reaches_a_tls_server(tmp_path: Path) -> None:
    server_ca = issue("test server CA", ca=True)
    server = issue("localhost", server_ca)
    chain = write(tmp_path / "server.pem", server.cert_pem + server_ca.cert_pem)
    key = write(tmp_path / "server.key", server.key_pem)
    ca = write(tmp_path / "ca.pem", server_ca.cert_pem)
    async with group_gateway(tls_cert=chain, tls_key=key) as gateway:
        target = f"localhost:{gateway.port}"
        plain = await cli("group", "list", "--target", target)
        assert plain.code == 1
        trusted = await cli("group", "create", "g", "--target", target, "--tls-ca", str(ca))
        assert trusted.code == 0, trusted.err
        missing = await cli("group", "list", "--target", target, "--tls-ca", str(tmp_path / "x"))
        assert missing.code == 2 and "--tls-ca" in missing.err

        # health calls the server too, so it takes --tls-ca like the others.
        health = await cli("health", "--target", target, "--tls-ca", str(ca))
        assert health.code == 0, health.err
        assert health.out == f"{target}: SERVING\n"
        from_variable = await cli(
            "health", "--target", target, env={"ORDER_GATEWAY_TLS_CA": str(ca)}
        )
        assert from_variable.code == 0, from_variable.err
        # Plaintext against TLS: health says why, as the others do, not UNAVAILABLE alone.
        plain_health = await cli("health", "--target", target, "--timeout", "2")
        assert plain_health.code == 1
        assert plain_health.err.startswith(f"{target}: UNAVAILABLE: ")
        assert "Socket closed" in plain_health.err


async def test_tls_server_name_is_the_name_a_certificate_must_hold(tmp_path: Path) -> None:
    # A production certificate names the service, not the address a probe calls.
    server_ca = issue("test server CA", ca=True)
    server = issue("gw", server_ca, server_names=[x509.DNSName("gw.example.com")])
    chain = write(tmp_path / "server.pem", server.cert_pem + server_ca.cert_pem)
    key = write(tmp_path / "server.key", server.key_pem)
    ca = str(write(tmp_path / "ca.pem", server_ca.cert_pem))
    async with group_gateway(tls_cert=chain, tls_key=key) as gateway:
        target = f"127.0.0.1:{gateway.port}"
        checked_by_address = await cli("health", "--target", target, "--tls-ca", ca)
        assert checked_by_address.code == 1
        assert "Hostname Verification Check failed" in checked_by_address.err
        named = ("--target", target, "--tls-ca", ca, "--tls-server-name", "gw.example.com")
        assert (await cli("health", *named)).out == f"{target}: SERVING\n"
        assert (await cli("group", "create", "g", *named)).code == 0
        listed = await cli(
            "group", "list", "--target", target, "--tls-ca", ca,
            env={"ORDER_GATEWAY_TLS_SERVER_NAME": "gw.example.com"},
        )  # fmt: skip
        assert [line["name"] for line in listed.lines] == ["g"], listed.err
        wrong = await cli("health", "--target", target, "--tls-ca", ca, "--tls-server-name", "x")
        assert wrong.code == 1 and "Hostname Verification Check failed" in wrong.err
    overlong = await cli(
        "health", "--target", target, "--tls-ca", ca, "--tls-server-name", "x" * 300
    )
    assert overlong.code == 2 and "not a host name" in overlong.err
    plaintext = await cli("group", "list", "--target", target, "--tls-server-name", "gw")
    assert plaintext.code == 2
    assert "--tls-server-name (ORDER_GATEWAY_TLS_SERVER_NAME) is for a gateway that speaks TLS" in (
        plaintext.err
    )


async def test_health_of_a_gateway_it_cannot_reach_says_why() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    target = f"127.0.0.1:{closed.getsockname()[1]}"
    with closed:  # bound and not listening: the port refuses connections
        health = await cli("health", "--target", target, "--timeout", "2")
    assert (health.code, health.out) == (1, "")
    assert health.err.startswith(f"{target}: UNAVAILABLE: ")
    assert "Connection refused" in health.err


@pytest.mark.parametrize("token", ["é", "a\nb", "tab\there"])
@pytest.mark.parametrize("command", [["tail"], ["group", "list"], ["consume", "--group", "g"]])
async def test_a_token_grpc_metadata_cannot_carry_is_a_usage_error(
    command: list[str], token: str
) -> None:
    # Nothing listens there: the token is refused before any call.
    by_flag = await cli(*command, "--target", "127.0.0.1:9", "--token", token)
    by_variable = await cli(*command, "--target", "127.0.0.1:9", env={"ORDER_GATEWAY_TOKEN": token})
    for refused in (by_flag, by_variable):
        assert refused.code == 2
        assert refused.err == (
            "order-gateway: --token (or ORDER_GATEWAY_TOKEN): a token is printable ASCII only\n"
        )


async def _run_cli(*args: str, stdout: int) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", *args, stdout=stdout, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, err.decode()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_group_output_that_cannot_be_written_is_exit_1_and_a_closed_one_exit_0(
    gateway: Gateway,
) -> None:
    target = f"127.0.0.1:{gateway.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        for n in range(300):  # more than a pipe's buffer holds
            await stub.CreateConsumerGroup(pb.CreateConsumerGroupRequest(name=f"group-{n:03}"))
    full = os.open("/dev/full", os.O_WRONLY)  # every write fails: no space left
    try:
        code, err = await _run_cli("group", "list", "--target", target, stdout=full)
    finally:
        os.close(full)
    assert (code, err) == (1, "order-gateway: cannot write the output: No space left on device\n")

    read, write = os.pipe()
    os.close(read)  # as after `| head`: the reader is gone
    try:
        code, err = await _run_cli("group", "list", "--target", target, stdout=write)
    finally:
        os.close(write)
    assert (code, err) == (0, "")


async def test_client_commands_call_the_gateway_this_hosts_settings_serve(
    gateway: Gateway,
) -> None:
    listen = {"ORDER_GATEWAY_LISTEN": f"0.0.0.0:{gateway.port}"}
    created = await cli("group", "create", "billing", env=listen)
    assert created.code == 0, created.err
    assert created.lines[0]["name"] == "billing"
    consumed = await cli("consume", "--group", "nowhere", env=listen)
    assert (consumed.code, consumed.err.split(":")[1].strip()) == (1, "NOT_FOUND")


async def test_client_commands_call_the_target_of_its_variable_before_the_listen_port(
    gateway: Gateway,
) -> None:
    target = f"127.0.0.1:{gateway.port}"
    nowhere = f"127.0.0.1:{free_port()}"
    env = {"ORDER_GATEWAY_TARGET": target, "ORDER_GATEWAY_LISTEN": nowhere}
    health = await cli("health", env=env)
    assert (health.code, health.out) == (0, f"{target}: SERVING\n")
    listed = await cli("group", "list", env=env)
    assert listed.code == 0, listed.err
    # The flag wins over the variable.
    flagged = await cli("health", "--target", nowhere, env=env)
    assert flagged.code == 1 and flagged.err.startswith(f"{nowhere}: UNAVAILABLE")


async def test_a_group_command_gives_up_at_its_timeout() -> None:
    # A listener that accepts connections and never answers: no gRPC server. Its writers
    # are held: from Python 3.12 on, a writer collected closes its connection.
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda reader, writer: held.append(writer), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    async with silent:
        try:
            listed = await cli("group", "list", "--target", f"127.0.0.1:{port}", "--timeout", "1")
        finally:
            for writer in held:  # the server's close waits for its connections
                writer.close()
    assert listed.code == 1
    assert "DEADLINE_EXCEEDED" in listed.err


@pytest.mark.parametrize("command", [["tail"], ["consume", "--group", "billing"]])
def test_a_stream_command_gives_up_on_a_connection_that_never_completes(
    command: list[str],
) -> None:
    # Listening but never accepting: the kernel completes TCP, no gRPC server answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        argv = [*command, "--target", target, "--timeout", "1"]
        # Killed at 20 s rather than left waiting, as it was before the timeout.
        ended = subprocess.run(
            [sys.executable, "-m", "server.cli", *argv], capture_output=True, text=True, timeout=20
        )
    assert (ended.returncode, ended.stdout) == (1, "")
    assert f"DEADLINE_EXCEEDED: no connection to {target} within 1 s" in ended.stderr


@pytest.mark.parametrize("command", [["tail"], ["consume", "--group", "billing"]])
def test_ctrl_c_while_a_stream_command_waits_for_its_connection_exits_0(
    command: list[str],
) -> None:
    # A listener that takes the connection and never answers: the command waits in its
    # --timeout window. Run as the installed command is (``python -m server``).
    with socket.create_server(("127.0.0.1", 0)) as silent:
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        process = subprocess.Popen(
            [sys.executable, "-m", "server", *command, "--target", target, "--timeout", "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        silent.settimeout(30)
        connection, _ = silent.accept()  # The command runs, waiting for its connection.
        with connection:
            process.send_signal(signal.SIGINT)
            try:
                # Well under the 20 s after which grpc gives up connecting, which ended
                # the wait of a command that missed its Ctrl-C.
                out, err = process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                pytest.fail("still running 10 s after its Ctrl-C")
    assert (process.returncode, out, err) == (0, "", "")


def test_a_ctrl_c_taken_by_another_thread_ends_the_wait_for_a_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kernel hands a process's SIGINT to any of its threads that does not block it,
    # one of grpc's as well as the main thread; Python's handler, run there, only notes it
    # for the main thread. A thread of the test's own takes it here, every time.
    # connection_settles sets threading.excepthook for good: put back after the test.
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threads = set(threading.enumerate())
    accepted: list[tuple[socket.socket, float]] = []
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.settimeout(30)

        def ctrl_c_once_connected() -> None:
            connection, _ = silent.accept()
            accepted.append((connection, time.monotonic()))
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)

        threading.Thread(target=ctrl_c_once_connected, daemon=True).start()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        try:
            with ctrl_c_stops() as ctrl_c, grpc.insecure_channel(target) as channel:
                assert not connection_settles(channel, 60, ctrl_c)
                assert ctrl_c.pressed
        finally:
            signal.signal(signal.SIGINT, previous)
        connection, sent = accepted[0]
        connection.close()
    # Well under the 20 s after which grpc gives up connecting, which ended the wait.
    assert time.monotonic() - sent < 5
    # grpc's polling thread watches on for up to 0.2 s and then fails on the closed
    # channel: joined while the excepthook connection_settles set still quiets it.
    for thread in set(threading.enumerate()) - threads:
        thread.join(5)


async def test_a_stream_command_once_connected_outlives_its_timeout(gateway: Gateway) -> None:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "server.cli", "tail", "--target", f"127.0.0.1:{gateway.port}"),
        *("--timeout", "0.5"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(2)
    assert process.returncode is None, "the stream has no deadline"
    await restock(gateway, 1)
    line = await asyncio.wait_for(process.stdout.readline(), 10)  # type: ignore[union-attr]
    assert json.loads(line)["position"] == "1"
    process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(process.wait(), 10) == 0


def _calls() -> int:
    return sum(isinstance(found, grpc.Call) for found in gc.get_objects())


@pytest.mark.parametrize("command", ["tail", "consume"])
def test_a_failed_stream_is_freed_when_the_command_returns(command: str) -> None:
    # grpc raises a failed call as its own exception, in a reference cycle with its
    # traceback. Left to the interpreter's last collection, its finalizer waits for the
    # call's lock, which a grpc daemon thread stopped by the interpreter's shutdown may
    # hold for good: the command would not exit. Nothing may be left for that collection.
    out, err = io.StringIO(), io.StringIO()
    gc.collect()
    gc.disable()
    try:
        before = _calls()
        # Nothing listens there: the call fails at once with UNAVAILABLE.
        with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
            if command == "tail":
                status = follow(channel, 0, [], out, err)
            else:
                status = follow_group(channel, "g", "", out, err)
        left = _calls() - before
    finally:
        gc.enable()
    assert (status, out.getvalue()) == (1, "")
    assert err.getvalue().startswith(f"order-gateway {command}: UNAVAILABLE: ")
    assert left == 0


class Cancelled(grpc.RpcError):
    pass


class WaitsUntilCancelled:
    """A call that waits for its next message, as grpc's blocking client does (in slices
    of 0.1 s, during which Python runs signal handlers), until it is cancelled."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def __iter__(self) -> WaitsUntilCancelled:
        return self

    def __next__(self) -> object:
        while not self.cancelled.wait(0.1):
            pass
        raise Cancelled()

    def cancel(self) -> None:
        self.cancelled.set()


class ChannelOfOneCall:
    def __init__(self, call: WaitsUntilCancelled | Answers) -> None:
        self.call = call

    def unary_stream(self, *_: object, **__: object) -> object:
        return lambda *_, **__: self.call

    unary_unary = stream_stream = unary_stream


@pytest.mark.parametrize("command", ["tail", "consume"])
def test_ctrl_c_while_a_stream_waits_for_a_message_cancels_the_call_and_exits_0(
    command: str,
) -> None:
    # Two SIGINTs, as ``timeout -s INT`` sends them (to the command and its process
    # group), from another thread: the handler runs in the main thread while it waits.
    call = WaitsUntilCancelled()
    channel = cast(grpc.Channel, ChannelOfOneCall(call))
    out, err = io.StringIO(), io.StringIO()
    previous = signal.getsignal(signal.SIGINT)

    def press_twice() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    pressing = threading.Timer(0.3, press_twice)
    try:
        with ctrl_c_stops() as ctrl_c:
            pressing.start()
            if command == "tail":
                status = follow(channel, 0, [], out, err, ctrl_c=ctrl_c)
            else:
                status = follow_group(channel, "g", "", out, err, ctrl_c=ctrl_c)
        # Pressed: a later SIGINT is ignored while the command exits.
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        pressing.join()
        signal.signal(signal.SIGINT, previous)
    assert (status, out.getvalue(), err.getvalue()) == (0, "", "")
    assert call.cancelled.is_set()


def past_python_s_start(pid: int) -> bool:
    """Whether the command's own code runs: it holds SIGTERM from its first line
    (``server.launch``; Python itself catches SIGINT before it even imports site), and
    gives it back once grpc's core, imported after, is loaded."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return catches(pid, signal.SIGTERM) or "cygrpc" in maps


@pytest.mark.parametrize("command", [["tail"], ["consume", "--group", "g"]])
async def test_a_stream_command_exits_0_on_a_ctrl_c_at_any_moment_of_its_run(
    gateway: Gateway, command: list[str]
) -> None:
    # A Ctrl-C raised as a KeyboardInterrupt inside grpc's client code (creating the
    # call, closing the channel, waiting on the call's condition) could leave one of its
    # locks held: ``timeout -s INT 0.3 order-gateway tail`` then never exited, 9 runs in
    # 60. Two SIGINTs each, as ``timeout -s INT`` sends, at moments spread over the
    # command's start, its connection and its stream.
    target = f"127.0.0.1:{gateway.port}"
    await cli("group", "create", "g", "--target", target)
    argv = [sys.executable, "-m", "server", *command, "--target", target]
    delays = [0.2 + 0.1 * step for step in range(16)]
    for batch in range(0, len(delays), 4):
        runs = [
            (
                await asyncio.create_subprocess_exec(
                    *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
                ),
                delay,
            )
            for delay in delays[batch : batch + 4]
        ]
        started = time.monotonic()
        for process, delay in runs:
            await asyncio.sleep(max(0.0, started + delay - time.monotonic()))
            # Not before the interpreter runs the command's code: a SIGINT that comes while
            # Python itself still starts (its site module, on a loaded machine) ends it with
            # "Fatal Python error" (status 1) before any code of the gateway's runs.
            while not past_python_s_start(process.pid):  # noqa: ASYNC110 - polls /proc
                await asyncio.sleep(0.005)
            process.send_signal(signal.SIGINT)
            process.send_signal(signal.SIGINT)
        for process, delay in runs:
            try:
                _, err = await asyncio.wait_for(process.communicate(), 10)
            except TimeoutError:
                process.kill()
                await process.communicate()
                pytest.fail(f"{command[0]} still running 10 s after a Ctrl-C at {delay:.1f} s")
            # Nothing on stderr but consume's own news of its partitions.
            said = [line for line in err.decode().splitlines() if "has partitions" not in line]
            assert (process.returncode, said) == (0, []), delay


class Answers:
    """A call that answers ``responses``, then ends (OK)."""

    def __init__(self, *responses: pb.ConsumeResponse) -> None:
        self.responses = iter(responses)

    def __iter__(self) -> Answers:
        return self

    def __next__(self) -> pb.ConsumeResponse:
        return next(self.responses)

    def cancel(self) -> None:
        pass


def test_consume_calls_a_member_a_standby_only_once_its_partitions_were_taken_away() -> None:
    # No partition in the first Assignment: on PostgreSQL and with --workers, the member's
    # come in the next one, unless the group has more members than partitions; none after
    # some: they went to other members.
    def assignment(*partitions: int) -> pb.ConsumeResponse:
        return pb.ConsumeResponse(assignment=pb.Assignment(member_id="m", partitions=partitions))

    call = Answers(assignment(), assignment(0, 1), assignment(), assignment(1))
    out, err = io.StringIO(), io.StringIO()
    status = follow_group(cast(grpc.Channel, ChannelOfOneCall(call)), "g", "m", out, err)
    assert (status, out.getvalue()) == (0, "")
    assert err.getvalue().splitlines() == [
        "order-gateway consume: member m has partitions none yet",
        "order-gateway consume: member m has partitions 0, 1",
        "order-gateway consume: member m has partitions none (standby)",
        "order-gateway consume: member m has partitions 1",
    ]


def _poll_connectivity() -> None:
    raise ValueError("Cannot monitor channel state: Channel closed!")


def _other_work() -> None:
    raise ValueError("something else")


def test_grpc_s_polling_of_a_closed_channel_prints_nothing_other_errors_still_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # grpc's polling thread, still watching after the command's Ctrl-C closed the channel.
    for target in (_poll_connectivity, _other_work):
        try:
            target()
        except ValueError as error:
            quiet_polling_of_closed_channels(
                threading.ExceptHookArgs((ValueError, error, error.__traceback__, None))
            )
    printed = capsys.readouterr().err
    assert "something else" in printed
    assert "Channel closed" not in printed


@pytest.mark.parametrize("command", [["tail"], ["consume", "--group", "billing", "--member", "m"]])
async def test_a_stream_command_started_with_its_output_closed_exits_1_at_once(
    gateway: Gateway, command: list[str]
) -> None:
    """It writes only when an event comes: on a quiet stream it waited for one without
    end, and a consumer held every partition of its group meanwhile."""
    target = f"127.0.0.1:{gateway.port}"
    assert (await cli("group", "create", "billing", "--target", target)).code == 0
    process = await asyncio.create_subprocess_exec(
        *("sh", "-c", 'exec "$0" "$@" >&-', sys.executable, "-m", "server.cli"),
        *command,
        *("--target", target),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    program = f"order-gateway {command[0]}"
    assert (process.returncode, err.decode()) == (
        1,
        f"{program}: cannot write the events: the standard output is closed\n",
    )
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        group = await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="billing"))
    assert list(group.group.members) == []
