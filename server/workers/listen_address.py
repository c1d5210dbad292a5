"""The workers' shared listen address: refused if a stranger holds it, reserved while we do.

Workers listen with ``SO_REUSEPORT`` so that the kernel spreads connections over them
(grpc's examples/python/multiprocessing). That option would also let them share the port
with any other process that set it, grpc servers included (grpc sets it by default), and
split calls with a stranger unnoticed. So before any worker starts, the supervisor binds
the address without ``SO_REUSEPORT``: that fails if anything listens there. Then it
keeps a socket bound with ``SO_REUSEPORT`` (never listening, so it takes no connections)
for as long as it runs: the port stays ours while a worker is being replaced, port 0
becomes one port every worker shares, and a later gateway without ``--workers`` (which
binds without ``SO_REUSEPORT``) is refused.

A gateway without ``--workers`` checks its address the same way (``check_free``): grpc
binds what it can of an address that resolves to several and serves there, so
``localhost`` (both loopback addresses, for grpc) with a stranger on one of them would
otherwise serve on the other.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from dataclasses import dataclass, field

from server.config import split_host_port


class ListenError(OSError):
    """``listen`` cannot be listened on; ``reason`` says why, without the address."""

    def __init__(self, errno_: int | None, listen: str, reason: str) -> None:
        super().__init__(errno_, f"cannot listen on {listen}: {reason}")
        self.reason = reason


class AddressInUseError(ListenError):
    """The address is taken; ``reason`` says by what, as far as this host can tell."""


LISTENED_ON = "another process listens there"
HELD_NOT_LISTENED_ON = (
    "the port is taken, but nothing listens there: a connection that used it as its own"
    " port (a port in the range the system picks them from, net.ipv4.ip_local_port_range)"
    " may hold it for up to a minute after it closed (TIME_WAIT); wait, or choose a port"
    " outside that range"
)


@dataclass
class Reservation:
    host: str
    port: int
    sockets: list[socket.socket] = field(default_factory=list)

    @property
    def listen(self) -> str:
        """The address for the workers' ``--listen``, with the chosen port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def release(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


LOCALHOST = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))
"""What grpc binds for ``localhost``: both loopback addresses, whatever the resolver says."""

_NOT_HERE = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
"""A loopback address of ``localhost`` this host lacks (IPv6 off): grpc skips it, so do we."""


_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}
"""A wildcard address is reached, from this host, through its loopback address."""


def _addresses(host: str, port: int) -> list[tuple[int, tuple[str, int]]]:
    if host == "localhost":
        return [(family, (address, port)) for family, address in LOCALHOST]
    found = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )
    unique: dict[tuple[int, tuple[str, int]], None] = {}
    for family, _, _, _, address in found:
        if family in (socket.AF_INET, socket.AF_INET6):
            unique[(family, (str(address[0]), int(address[1])))] = None
    return list(unique)


def _resolved(listen: str) -> tuple[str, int, list[tuple[int, tuple[str, int]]]]:
    """The host and port of ``listen``, and the addresses grpc would bind there; a host
    that does not resolve is a ``ListenError`` naming the address (the resolver's error
    names none)."""
    host, port = split_host_port(listen)
    try:
        return host, port, _addresses(host, port)
    except socket.gaierror as error:
        raise ListenError(error.errno, listen, error.strerror or str(error)) from error


def _check_free(family: int, address: tuple[str, int], listen: str, optional: bool) -> None:
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError as error:
        if optional and error.errno in _NOT_HERE:
            return
        raise
    with probe:
        # SO_REUSEADDR, as grpc sets it: connections of an earlier server still in
        # TIME_WAIT do not count, a listening socket does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if optional and error.errno in _NOT_HERE:
                return
            if error.errno == errno.EADDRINUSE:
                reason = LISTENED_ON if _listened_on(family, address) else HELD_NOT_LISTENED_ON
                raise AddressInUseError(error.errno, listen, reason) from error
            raise ListenError(error.errno, listen, error.strerror or str(error)) from error


def _listened_on(family: int, address: tuple[str, int]) -> bool:
    """Whether something takes connections at ``address`` (a wildcard: on loopback)."""
    host = _WILDCARDS.get(address[0], address[0])
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect((host, address[1]))
        except OSError:
            return False
    return True


def check_free(listen: str) -> None:
    """Refuse ``listen`` if anything listens on one of the addresses grpc would bind
    there, or if one of them cannot be bound at all (port 0 included, for which the OS
    picks a free port: the address itself may be no interface's)."""
    host, _, addresses = _resolved(listen)
    for family, address in addresses:
        _check_free(family, address, listen, optional=host == "localhost")


def reserve(listen: str) -> Reservation:
    """Check that nothing listens on ``listen`` and reserve it for the workers."""
    check_free(listen)
    host, port, addresses = _resolved(listen)
    reservation = Reservation(host, port)
    try:
        for family, address in addresses:
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as error:
                if host == "localhost" and error.errno in _NOT_HERE:
                    continue
                raise
            reservation.sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # As grpc and the check: an earlier server's connections in TIME_WAIT on the
            # port must not keep the workers from it (only a listening socket may).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address[0], reservation.port))
            except OSError as error:
                if host == "localhost" and error.errno in _NOT_HERE:
                    reservation.sockets.remove(sock)
                    sock.close()
                    continue
                raise
            reservation.port = sock.getsockname()[1]
    except OSError as error:
        reservation.release()
        raise ListenError(error.errno, listen, error.strerror or str(error)) from error
    return reservation


def _reachable(host: str, port: int) -> list[tuple[int, tuple[str, int]]]:
    host = host.strip("[]")
    if host in _WILDCARDS:
        address = _WILDCARDS[host]
        return [(socket.AF_INET6 if ":" in address else socket.AF_INET, (address, port))]
    return _addresses(host, port)


async def until_nobody_listens(listen: str, port: int, most: float) -> bool:
    """Wait until no process takes connections on ``listen`` with ``port`` (the other
    workers have closed their listening sockets), or ``most`` seconds; returns whether
    nobody does. A connection the probe opens is closed at once, before any byte."""
    host = split_host_port(listen)[0]
    try:
        addresses = _reachable(host, port)
    except OSError:
        return False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + most
    while True:
        if not any([await _takes_connections(address) for _, address in addresses]):
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.005)


async def _takes_connections(address: tuple[str, int]) -> bool:
    try:
        async with asyncio.timeout(0.1):
            _, writer = await asyncio.open_connection(address[0], address[1])
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def shares_address(listen: str, other: str) -> bool:
    """Whether ``other`` names an address ``listen`` takes too: the same port, on an
    address both resolve to, or on a wildcard address. Binding both would not tell while
    the workers' reservation does not listen yet."""
    host, port = split_host_port(listen)
    other_host, other_port = split_host_port(other)
    if port == 0 or port != other_port:
        return False
    try:
        ours = {address for _, (address, _) in _addresses(host, port)}
        theirs = {address for _, (address, _) in _addresses(other_host, other_port)}
    except OSError:
        return False
    return bool(ours & theirs) or bool((ours | theirs) & {"0.0.0.0", "::"})
