"""Databases and roles of their own on the test PostgreSQL server, for tests that need a
new one."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

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


@contextlib.contextmanager
def new_role(database_url: str, *grants: str) -> Iterator[str]:
    """The URL of a new login role (no password) on ``database_url``'s database with only
    ``grants`` (each what follows GRANT, e.g. "SELECT ON events"); dropped after."""
    role = f"gateway_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as owner:
        owner.execute(f"CREATE ROLE {role} LOGIN")
        for grant in grants:
            owner.execute(f"GRANT {grant} TO {role}")
    try:
        parts = urlsplit(database_url)
        yield urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))
    finally:
        with psycopg.connect(database_url, autocommit=True) as owner:
            owner.execute(f"DROP OWNED BY {role}")
            owner.execute(f"DROP ROLE {role}")
