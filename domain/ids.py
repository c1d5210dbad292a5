"""New ids: time-ordered random UUIDs (version 7) as the hyphenated strings the domain uses,
and the random bytes behind them."""

from __future__ import annotations

import binascii
import os
import threading
import time

POOL_BYTES = 4096
"""Bytes read from ``os.urandom`` at once (about 400 ids' worth)."""


class _RandomPool:
    """The operating system's random bytes, read in blocks and handed out in slices.

    Every ``os.urandom`` call is a ``getrandom`` system call, made three to five times
    per command on the event loop's thread. Under load those calls cost far more than
    their own 0.3 µs (cProfile: ~6 µs each with the SQLite writer thread busy; a system
    call is likely where the kernel switches to that thread, while the event loop holds
    the GIL). From a pool, measured: in-process SQLite went from about 9,200 to 11,000
    commands/s and system CPU per command from 33 to 11 µs. The bytes are the same; only
    the reads are batched. Thread-safe; a forked child starts a pool of its own, so that
    parent and child never hand out the same bytes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._block = b""
        self._offset = 0

    def take(self, size: int) -> bytes:
        """``size`` fresh bytes, at most ``POOL_BYTES``."""
        with self._lock:
            start = self._offset
            if start + size > len(self._block):
                self._block = os.urandom(POOL_BYTES)
                start = 0
            self._offset = start + size
            return self._block[start : start + size]

    def forget(self) -> None:
        """Drop every byte read so far (in a forked child: they are also the parent's)."""
        self._lock = threading.Lock()
        self._block = b""
        self._offset = 0


_pool = _RandomPool()
os.register_at_fork(after_in_child=_pool.forget)


HEX_IDS_PER_BATCH = 256
"""Random hex ids cut at once from one read of the pool (4,096 random bytes)."""


class _HexIds:
    """Ids of 32 random hex digits, cut from one long hex string a batch at a time.

    ``_pool.take(16).hex()`` cost about 5,300 instructions an id under callgrind (the
    pool's call and lock, the slice, the hex), on every call that brings no request id;
    popped from a batch, an id costs about 2,600. The digits are the same pool's bytes.
    Thread-safe without a lock, as ``_Uuid7s``'s tails are.
    """

    def __init__(self) -> None:
        self._ids: list[str] = []

    def new(self) -> str:
        try:
            return self._ids.pop()
        except IndexError:
            digits = _pool.take(16 * HEX_IDS_PER_BATCH).hex()
            self._ids = ids = [digits[start : start + 32] for start in range(0, len(digits), 32)]
            return ids.pop()

    def forget(self) -> None:
        """Drop the ids cut so far (in a forked child: they are also the parent's)."""
        self._ids = []


_hex_ids = _HexIds()
os.register_at_fork(after_in_child=_hex_ids.forget)


def random_hex_id() -> str:
    """A new id of 32 lower-case hex digits: 128 random bits of the operating system's
    CSPRNG, as ``os.urandom(16).hex()`` would make it."""
    return _hex_ids.new()


TAILS_PER_BATCH = 256
"""Random tails of new ids formatted at once (2,560 random bytes)."""

_VARIANT = bytes((byte & 0xF3) | 0x08 for byte in range(256))
"""A random byte → the byte whose low hex digit is the RFC 9562 variant digit (8 to b),
keeping two of its random bits."""

_TAIL_LINE = b"---------------------\n"
"""A tail's line in a batch before its digits are put in: 21 characters and a newline."""

_TAIL_DIGITS = tuple(i for i, char in enumerate("xxx-Vxxx-xxxxxxxxxxxx") if char != "-")
"""Where the 19 hex digits of a tail go in its line: everywhere but the dashes."""


class _Uuid7s:
    """Version-7 UUIDs as strings: a prefix per millisecond, and random tails made in batches.

    Formatting each id from its 16 bytes (bit masks, ``hex``, five slices) cost about
    15,000 instructions, four times per CreateOrder; the time part changes once a
    millisecond, and the tails' random digits are read and formatted together, so an id
    now costs about 4,300. Thread-safe without a lock: the stamp is swapped as one
    ``(millisecond, prefix)`` tuple, and ``list.pop`` hands each tail out once (a thread
    that finds the list empty refills it with a list of its own).
    """

    def __init__(self) -> None:
        self._stamp = (-1, "")
        self._tails: list[str] = []

    def new(self) -> str:
        milliseconds = time.time_ns() // 1_000_000 % (1 << 48)
        stamp = self._stamp
        if stamp[0] != milliseconds:
            digits = f"{milliseconds:012x}"
            stamp = self._stamp = (milliseconds, f"{digits[:8]}-{digits[8:]}-7")
        try:
            tail = self._tails.pop()
        except IndexError:
            self._tails = tails = _tails(TAILS_PER_BATCH)
            tail = tails.pop()
        return stamp[1] + tail

    def forget(self) -> None:
        """Drop the tails made so far (in a forked child: they are also the parent's)."""
        self._tails = []


def _tails(count: int) -> list[str]:
    """``count`` random tails "xxx-Vxxx-xxxxxxxxxxxx" (74 random bits each, V the variant).

    Each tail is the first 19 hex digits of 10 random bytes. They are put in place a digit
    position at a time for the whole batch (19 strided copies, each in C) instead of a
    tail at a time: formatting each tail with slices and an f-string cost about 5,100
    instructions, four times per CreateOrder; this way a tail costs about 1,200.
    """
    raw = bytearray(_pool.take(10 * count))
    raw[1::10] = raw[1::10].translate(_VARIANT)  # the fourth digit of every tail
    digits = binascii.hexlify(raw)
    text = bytearray(_TAIL_LINE * count)
    for source, target in enumerate(_TAIL_DIGITS):
        text[target :: len(_TAIL_LINE)] = digits[source::20]
    return text.decode().split()


_uuid7s = _Uuid7s()
os.register_at_fork(after_in_child=_uuid7s.forget)


def new_uuid() -> str:
    """A fresh RFC 9562 version-7 UUID in lower-case hyphenated form.

    48 bits of Unix time in milliseconds, then 74 random bits of the operating system's
    CSPRNG: as hard to guess as it needs to be, and ids made one after another sort
    together. The stores index command ids and ``order-<id>`` streams, so each new one
    lands at the end of its index instead of on a random page: with random (version-4)
    ids every SQLite commit dirtied about two random index pages, roughly 20 KB of WAL.
    Built without a ``uuid.UUID`` object, whose integer round trip cost more than the
    random bytes.
    """
    return _uuid7s.new()
