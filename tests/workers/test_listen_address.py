"""The listen address the workers of ``serve --workers N`` share."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from server.workers.listen_address import AddressInUseError, check_free, reserve
from tests.serving import gateway_log, start_gateway
from tests.workers_support import WAIT, env_without_settings


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


def port_a_closed_client_connection_holds() -> int:
    """A loopback port nothing listens on, held by a client connection that used it as
    its own port and closed first (TIME_WAIT): no bind can take it for a minute."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        port: int = client.getsockname()[1]
        accepted, _ = listener.accept()
        client.close()
        accepted.close()
    return port


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_held_by_a_closed_connection_is_refused_as_such_not_as_listened_on(
    tmp_path: Path, workers: str
) -> None:
    port = port_a_closed_client_connection_holds()
    process = start_gateway(
        [
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            f"sqlite:///{tmp_path / 'e.db'}",
            "--workers",
            workers,
        ],
        env=env_without_settings(),
    )
    assert process.wait(timeout=WAIT) != 0
    log = gateway_log(process)
    assert "nothing listens there" in log and "TIME_WAIT" in log, log
    assert "another process listens there" not in log
    assert list(tmp_path.iterdir()) == []


def test_a_port_listened_on_is_refused_as_listened_on() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with pytest.raises(AddressInUseError) as refused:
            check_free(f"127.0.0.1:{port}")
    assert refused.value.reason == "another process listens there"
