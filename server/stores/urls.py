"""Store URLs as they may be shown: in log lines and error messages, never with a secret."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SECRET_URL_PARAMETERS = frozenset({"password", "sslpassword"})
"""Query parameters of a store URL that hold a secret (libpq accepts both)."""


def redacted_url(url: str) -> str:
    """``url`` without its password, in the user part or the query, fit for a log line."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        url = urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    parameters = parse_qsl(parts.query, keep_blank_values=True)
    if any(key in SECRET_URL_PARAMETERS for key, _ in parameters):
        # Rebuilt by hand: urlunsplit would also turn "postgresql:///db" into "postgresql:/db".
        query = urlencode(
            [(key, "***" if key in SECRET_URL_PARAMETERS else value) for key, value in parameters],
            safe="*",
        )
        fragment = f"#{parts.fragment}" if parts.fragment else ""
        url = f"{url.partition('?')[0]}?{query}{fragment}"
    return url
