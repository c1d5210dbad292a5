"""How the CLI's client commands print messages: one JSON object per line.

Keys are the proto field names (``event_type``, ``ack_timeout``), as in the API docs and
as grpcurl prints them, not protobuf's lowerCamelCase JSON names; fields at their zero
value are printed too (``"in_flight": 0``), since a person reading them should not have to
know proto3 leaves them out; and every object's keys come in the order of its message's
fields, as grpcurl prints them (protobuf's own printer puts the fields at their zero value
last, so that partition 0 of a group printed its ``checkpoint`` before its ``partition``).
"""

from __future__ import annotations

import json
from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message


def json_line(message: Message) -> str:
    """``message`` as one line of JSON (no newline), keyed by proto field names."""
    fields = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    descriptor = cast(Descriptor, message.DESCRIPTOR)
    return json.dumps(_in_field_order(descriptor, fields), ensure_ascii=False)


def _in_field_order(descriptor: Descriptor, fields: dict[str, Any]) -> dict[str, Any]:
    if descriptor.full_name.startswith("google.protobuf."):
        return fields  # well-known types print as JSON of their own (an Any's "@type")
    ordered: dict[str, Any] = {}
    for field in descriptor.fields:
        if field.name not in fields:
            continue
        value = fields[field.name]
        nested = field.message_type
        if nested is not None and not nested.GetOptions().map_entry:
            if isinstance(value, dict):
                value = _in_field_order(nested, value)
            elif isinstance(value, list):
                value = [_in_field_order(nested, v) if isinstance(v, dict) else v for v in value]
        ordered[field.name] = value
    # Anything else a printer wrote (an extension): kept, after the fields.
    return ordered | {key: value for key, value in fields.items() if key not in ordered}
