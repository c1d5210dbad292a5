"""Translation between domain events and the store's neutral records."""

from __future__ import annotations

from domain.events import EVENT_TYPES, DomainEvent
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
    )


def to_domain_event(record: RecordedEvent) -> DomainEvent:
    return EVENT_TYPES[record.event_type].model_validate_json(record.data)
