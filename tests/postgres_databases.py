"""Databases of their own on the test PostgreSQL server, for tests that need a new one."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import psycopg


@contextlib.contextmanager
def new_database(server_url: str, options: str = "", prefix: str = "test") -> Iterator[str]:
    """A new database on the server at ``server_url``, created with ``options`` (what
    follows its name in CREATE DATABASE) and dropped afterwards: its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" {options}')
    try:
        yield f"{server_url.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
