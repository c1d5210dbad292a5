"""Translation between domain events and the store's neutral records.

Records keep the payload as stored; reading one upcasts it to the event's current shape
first when it was stored in an older one (``domain.upcasting``).
"""

from __future__ import annotations

from pydantic_core import from_json

from domain.events import EVENT_TYPES, UPCASTERS, DomainEvent
from domain.ports import NewEvent, RecordedEvent


def to_new_event(event: DomainEvent, event_id: str, stream_id: str, version: int) -> NewEvent:
    return NewEvent(
        event_id=event_id,
        stream_id=stream_id,
        stream_version=version,
        event_type=event.event_type,
        # The serializer's own bytes: what model_dump_json() returns, before it decodes
        # them to a str that would only be encoded back.
        data=event.__pydantic_serializer__.to_json(event),
        schema_version=event.SCHEMA_VERSION,
    )


def to_domain_event(record: RecordedEvent) -> DomainEvent:
    return decode(record.event_type, record.schema_version, record.data)


def decode(event_type: str, schema_version: int, data: bytes) -> DomainEvent:
    """The current-version event stored as ``data`` in ``schema_version`` of ``event_type``.

    Raises KeyError for an unknown type, ``UnknownSchemaVersionError`` for an unknown
    version, ``pydantic.ValidationError`` for a payload that does not fit.
    """
    event_class = EVENT_TYPES[event_type]
    if schema_version == event_class.SCHEMA_VERSION:
        return event_class.model_validate_json(data)
    payload = UPCASTERS.upcast(event_type, schema_version, from_json(data))
    return event_class.model_validate(payload)
