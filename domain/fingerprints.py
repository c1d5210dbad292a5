"""Idempotency fingerprints: what makes a retried request "the same" as a recorded one.

A command's ``command_id`` is the caller's idempotency key; the fingerprint stored with
its commit tells a retry of the same request (replayed) from another request that reuses
the id (refused).
"""

from __future__ import annotations

import hashlib
import json
import re

from domain.commands import Command

FINGERPRINT_PREFIX = "2:"
_WELL_FORMED = re.compile(rf"(?:{re.escape(FINGERPRINT_PREFIX)})?[0-9a-f]{{64}}")


def fingerprint(command: Command) -> str:
    """A digest of what makes a request "the same" for idempotency: type, body, caller.

    The body is pydantic's own JSON of the command, in field declaration order (so
    reordering a command's fields would change every fingerprint: add fields at the end).
    """
    body = command.__pydantic_serializer__.to_json(command, exclude=command.IDEMPOTENCY_EXCLUDED)
    digest = hashlib.sha256(type(command).__name__.encode() + b"\0" + body).hexdigest()
    return FINGERPRINT_PREFIX + digest


def is_same_request(recorded_fingerprint: str, command: Command) -> bool:
    """Whether ``command`` is the request recorded with ``recorded_fingerprint``.

    Commands recorded before fingerprints carried a prefix were digested from sorted-key
    ``json.dumps`` output (four times slower to compute); their retries are still
    recognised.
    """
    if recorded_fingerprint.startswith(FINGERPRINT_PREFIX):
        return recorded_fingerprint == fingerprint(command)
    body = command.model_dump(mode="json", exclude=command.IDEMPOTENCY_EXCLUDED)
    legacy = json.dumps([type(command).__name__, body], sort_keys=True)
    return recorded_fingerprint == hashlib.sha256(legacy.encode()).hexdigest()


def is_well_formed(recorded_fingerprint: str) -> bool:
    """Whether ``recorded_fingerprint`` has a shape this gateway writes or wrote (a SHA-256
    in hex, prefixed or not): a damaged one would refuse every retry of its command as
    another request."""
    return _WELL_FORMED.fullmatch(recorded_fingerprint) is not None
