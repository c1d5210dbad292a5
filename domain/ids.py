"""New ids: time-ordered random UUIDs (version 7) as the hyphenated strings the domain uses."""

from __future__ import annotations

import os
import time


def new_uuid() -> str:
    """A fresh RFC 9562 version-7 UUID in lower-case hyphenated form.

    48 bits of Unix time in milliseconds, then 74 random bits (``os.urandom``): as hard to
    guess as it needs to be, and ids made one after another sort together. The stores
    index command ids and ``order-<id>`` streams, so each new one lands at the end of its
    index instead of on a random page: with random (version-4) ids every SQLite commit
    dirtied about two random index pages, roughly 20 KB of WAL. Built without a
    ``uuid.UUID`` object, whose integer round trip cost more than the random bytes.
    """
    milliseconds = time.time_ns() // 1_000_000 % (1 << 48)
    raw = bytearray(milliseconds.to_bytes(6, "big") + os.urandom(10))
    raw[6] = (raw[6] & 0x0F) | 0x70  # version 7
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 9562 variant
    digits = raw.hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
