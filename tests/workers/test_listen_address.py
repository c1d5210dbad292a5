"""The listen address the workers of ``serve --workers N`` share."""

from __future__ import annotations

import socket

from server.workers.listen_address import reserve


def port_with_a_connection_in_time_wait() -> int:
    """A loopback port nothing listens on, where a closed connection of an earlier
    server is in TIME_WAIT (the server closed first, as a stopping server does)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port: int = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()
            client.recv(1)  # the server's FIN
    return port


def test_a_port_whose_earlier_connections_are_in_time_wait_can_be_reserved() -> None:
    reservation = reserve(f"127.0.0.1:{port_with_a_connection_in_time_wait()}")
    reservation.release()
