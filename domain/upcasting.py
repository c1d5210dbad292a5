"""Upcasting: reading an event stored in an older shape as the current one.

Events are stored forever, and the code that reads them changes. Each event class
declares its ``SCHEMA_VERSION``, every stored event records the version it was written
in, and changing an event's shape means bumping its version and adding an upcaster from
the previous version: a pure function from the stored payload (parsed JSON) of version
n to the payload of version n + 1. Reading composes them, so a version-1 payload passes
through every step up to the current version; stored rows are never rewritten.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Payload = dict[str, Any]
Upcaster = Callable[[Payload], Payload]


class UnknownSchemaVersionError(ValueError):
    """A stored event's version has no way to the current one (written by a newer release)."""


class Upcasters:
    """The upcasters of every event type, checked to form complete chains.

    ``current``: each event type's current schema version. ``steps``: for each
    (event type, version n), the upcaster from n to n + 1; every version from 1 up to the
    current one needs one.
    """

    def __init__(
        self, current: Mapping[str, int], steps: Mapping[tuple[str, int], Upcaster]
    ) -> None:
        for (event_type, version), _ in steps.items():
            if not 1 <= version < current.get(event_type, 1):
                raise ValueError(f"upcaster from {event_type} v{version} leads past v{version}")
        for event_type, latest in current.items():
            missing = [v for v in range(1, latest) if (event_type, v) not in steps]
            if missing:
                raise ValueError(f"{event_type} has no upcaster from version {missing[0]}")
        self._current = dict(current)
        self._steps = dict(steps)

    def current(self, event_type: str) -> int:
        return self._current[event_type]

    def upcast(self, event_type: str, version: int, payload: Payload) -> Payload:
        """``payload``, stored as ``version`` of ``event_type``, in the current version."""
        latest = self._current[event_type]
        if not 1 <= version <= latest:
            raise UnknownSchemaVersionError(
                f"{event_type} schema version {version} is unknown here (current: {latest})"
            )
        for step in range(version, latest):
            payload = self._steps[(event_type, step)](payload)
        return payload
