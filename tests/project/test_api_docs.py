"""docs/api.md names everything a client of the protos can meet, and the repository's
documents point at it rather than at anything outside the repository."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FileDescriptor
from orders.v1 import (
    event_stream_service_pb2,
    events_pb2,
    inventory_command_service_pb2,
    order_command_service_pb2,
    types_pb2,
)

from server.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
API = (ROOT / "docs" / "api.md").read_text()
PROTO_FILES: list[FileDescriptor] = [
    module.DESCRIPTOR
    for module in (
        event_stream_service_pb2,
        events_pb2,
        inventory_command_service_pb2,
        order_command_service_pb2,
        types_pb2,
    )
]


def test_every_proto_file_of_the_package_is_checked() -> None:
    on_disk = {p.name for p in (ROOT / "protos" / "orders" / "v1").glob("*.proto")}
    assert {f.name.rpartition("/")[2] for f in PROTO_FILES} == on_disk


@pytest.mark.parametrize("file", PROTO_FILES, ids=lambda f: f.name)
def test_every_service_and_rpc_is_documented(file: FileDescriptor) -> None:
    for service in file.services_by_name.values():
        assert f"`{service.full_name}`" in API, service.full_name
        for method in service.methods:
            assert f"`{method.name}`" in API, method.full_name


def messages(file: FileDescriptor) -> list[Descriptor]:
    return list(file.message_types_by_name.values())


@pytest.mark.parametrize("file", PROTO_FILES, ids=lambda f: f.name)
def test_every_message_and_field_is_documented(file: FileDescriptor) -> None:
    for message in messages(file):
        assert f"`{message.name}" in API, message.full_name
        for field in message.fields:
            assert f"`{field.name}`" in API, field.full_name


def test_every_command_line_command_is_documented() -> None:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        assert f"order-gateway {name}" in API, name
        for action in command._actions:
            for option in action.option_strings:
                assert option == "-h" or option == "--help" or option in API, option


def test_no_document_points_outside_the_repository() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
    ).stdout.split("\0")
    outside = [
        path
        for path in tracked
        if path
        and not path.startswith(("generated/", "third_party/"))
        and (ROOT / path).is_file()
        and any(
            marker in (ROOT / path).read_text(errors="replace")
            for marker in ("../" + "shared", "shared/" + "pitfalls", "shared/" + "api-contract")
        )
    ]
    assert outside == []
