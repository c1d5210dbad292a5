"""The Python projection example (examples/python-projection) runs as two instances in one
consumer group and builds its read model completely, each event applied once; an
instance stops when told."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc

from server.app import Gateway
from server.consumer_groups.model import NAME
from tests.clients import Clients, item, order_request

DEMO = Path(__file__).resolve().parents[2] / "examples" / "python-projection" / "demo.py"
PROJECTION = DEMO.parent / "projection.py"


def test_two_projection_instances_build_the_read_model() -> None:
    finished = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=180, check=False
    )
    assert finished.returncode == 0, finished.stderr
    assert "read model complete: 40 orders" in finished.stdout
    # Both instances took part before one of them was stopped.
    assert "'alpha'" in finished.stdout and "'beta'" in finished.stdout


def start_instance(target: str, db: Path, member: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(PROJECTION), "--target", target, "--db", str(db),
         "--member", member],
        stderr=log.open("wb"),
    )  # fmt: skip


async def until(condition: Callable[[], bool], what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.05)


async def test_an_instance_stops_when_told_while_its_event_waits_for_the_read_model(
    gateway: Gateway, clients: Clients, tmp_path: Path
) -> None:
    """Another writer holds the read model's lock (SQLite lets an instance wait 30 s for
    it): a SIGTERM still ends the instance within seconds, and the event it could not
    apply goes to the instance that comes next."""
    target = f"127.0.0.1:{gateway.port}"
    db = tmp_path / "read-model.db"
    first = start_instance(target, db, "first", tmp_path / "first.log")
    second = None
    writer = None
    try:
        await until(lambda: "partitions [0" in (tmp_path / "first.log").read_text(), "joined")
        await clients.restock("mug", 1)
        writer = sqlite3.connect(db, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        created = await clients.create(order_request(item("mug")))
        order_id = created[0].order_created.order_id
        async with grpc.aio.insecure_channel(target) as channel:
            groups = pb_grpc.ConsumerGroupServiceStub(channel)
            request = pb.GetConsumerGroupRequest(name="order-status")

            async def in_flight() -> int:
                return (await groups.GetConsumerGroup(request)).group.in_flight

            deadline = time.monotonic() + 60
            while await in_flight() == 0:
                assert time.monotonic() < deadline, "the order was not delivered"
                await asyncio.sleep(0.05)
        stopped_at = time.monotonic()
        first.send_signal(signal.SIGTERM)
        await until(lambda: first.poll() is not None, "the instance exited after SIGTERM")
        # Generous for a loaded machine, and well below the 30 s the event may wait.
        assert time.monotonic() - stopped_at < 15
        assert first.returncode == 0, (tmp_path / "first.log").read_text()
        writer.execute("ROLLBACK")

        second = start_instance(target, db, "second", tmp_path / "second.log")

        def applied() -> bool:
            with contextlib.closing(sqlite3.connect(db, timeout=30)) as reader:
                rows = reader.execute("SELECT order_id, handled_by FROM orders").fetchall()
            return rows == [(order_id, "second")]

        await until(applied, "the order in the read model, applied by the next instance")
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        if writer is not None:
            writer.close()


async def test_an_instance_whose_read_model_cannot_be_opened_exits_with_a_failure(
    gateway: Gateway, tmp_path: Path
) -> None:
    """A supervisor restarts an instance that fails: one that cannot open its read model
    (here a directory) must say so by its exit status, not end as if stopped."""
    log = tmp_path / "instance.log"
    instance = start_instance(f"127.0.0.1:{gateway.port}", tmp_path, "broken", log)
    try:
        await until(lambda: instance.poll() is not None, "the instance exited")
        assert instance.returncode == 1
        assert "unable to open database file" in log.read_text()
    finally:
        if instance.poll() is None:
            instance.kill()
            instance.wait()


def test_an_instance_stops_when_told_while_the_gateway_does_not_answer(tmp_path: Path) -> None:
    """A gateway that takes connections and never answers (hung, or not a gateway):
    SIGTERM ends the instance while it waits to create its group."""
    log = tmp_path / "instance.log"
    with socket.create_server(("127.0.0.1", 0)) as silent:
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        instance = start_instance(target, tmp_path / "read-model.db", "waiting", log)
        try:
            silent.settimeout(30)
            connection, _ = silent.accept()  # The instance waits for its answer.
            with connection:
                time.sleep(0.5)
                stopped_at = time.monotonic()
                instance.send_signal(signal.SIGTERM)
                instance.wait(timeout=30)
                # Generous for a loaded machine; the group's creation would wait 10 s
                # for its deadline, and before it forever.
                assert time.monotonic() - stopped_at < 5
        finally:
            if instance.poll() is None:
                instance.kill()
                instance.wait()
    assert instance.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_an_instance_that_cannot_reach_the_gateway_says_so_and_fails(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        target = f"127.0.0.1:{closed.getsockname()[1]}"
    log = tmp_path / "instance.log"
    instance = start_instance(target, tmp_path / "read-model.db", "lost", log)
    try:
        instance.wait(timeout=60)
    finally:
        if instance.poll() is None:
            instance.kill()
            instance.wait()
    assert instance.returncode == 1
    assert "lost: UNAVAILABLE" in log.read_text()
    assert "Traceback" not in log.read_text()


# Instances that open a new read model at the same moment: each process of a pool of
# three waits at a barrier, then opens the same new file and writes to it.
CONCURRENT_OPENS = """
import multiprocessing, os, sys
sys.path.insert(0, sys.argv[1])
from projection import open_read_model

def open_and_write(path, barrier):
    barrier.wait()
    try:
        db = open_read_model(path)
        db.execute("INSERT INTO applied_events VALUES (?)", (str(os.getpid()),))
        return "ok"
    except Exception as error:
        return repr(error)

if __name__ == "__main__":
    with multiprocessing.Manager() as manager, multiprocessing.Pool(3) as pool:
        for attempt in range(30):
            path = os.path.join(sys.argv[2], f"read-model-{attempt}.db")
            barrier = manager.Barrier(3)
            print(*pool.starmap(open_and_write, [(path, barrier)] * 3))
"""


def test_instances_opening_a_new_read_model_together_all_open_it(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", CONCURRENT_OPENS, str(DEMO.parent), str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    results = finished.stdout.split()
    assert results == ["ok"] * 90, finished.stdout


def test_the_default_member_id_is_one_the_server_accepts_for_a_long_host_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A member id holds at most 64 of ``A-Z a-z 0-9 . _ -``: the example's default, made
    from the host name, must fit even for a long fully qualified one."""
    spec = importlib.util.spec_from_file_location("projection_example", PROJECTION)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(socket, "gethostname", lambda: "a" * 63 + "." + "b" * 60 + ".example")
    member = example.default_member()
    assert NAME.fullmatch(member), member
    assert member.startswith("aaa") and member.endswith(f"-{os.getpid()}")
