"""How the CLI's client commands print messages: one JSON object per line.

Keys are the proto field names (``event_type``, ``ack_timeout``), as in the API docs and
as grpcurl prints them, not protobuf's lowerCamelCase JSON names; and fields at their zero
value are printed too (``"in_flight": 0``), since a person reading them should not have to
know proto3 leaves them out.
"""

from __future__ import annotations

from google.protobuf import json_format
from google.protobuf.message import Message


def json_line(message: Message) -> str:
    """``message`` as one line of JSON (no newline), keyed by proto field names."""
    return json_format.MessageToJson(
        message,
        indent=None,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
