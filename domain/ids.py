"""Random (version 4) UUIDs as the hyphenated strings the domain stores and sends."""

from __future__ import annotations

import os


def new_uuid() -> str:
    """A random RFC 4122 version-4 UUID in lower-case hyphenated form.

    Same randomness as ``str(uuid.uuid4())`` (16 bytes of ``os.urandom``), without the
    ``uuid.UUID`` object in between: every command makes three or four of these, and the
    object's integer round trip cost more than the random bytes.
    """
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    digits = raw.hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
