"""Store URLs as they may be shown: in log lines and error messages, never with a secret."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode

from domain.errors import ConfigurationError

SECRET_URL_PARAMETERS = frozenset({"password", "sslpassword"})
"""Query parameters of a store URL that hold a secret (libpq accepts both)."""
MASK = "***"

_KEYWORD_SECRET = re.compile(
    r"\b(?P<key>(?:ssl)?password)(?P<equals>\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'?|\S*)",
    re.IGNORECASE,
)
"""A secret in libpq's keyword/value form (``host=db password='s e cret'``): a single-quoted
value (with backslash escapes) or one without spaces."""


class StoreURLError(ConfigurationError):
    """A store URL that cannot be used; its message shows the URL redacted."""


def redacted_url(url: str) -> str:
    """``url`` without its password, in the user part or the query, fit for a log line.

    Never fails, whatever ``url`` holds: it is called to report URLs that are malformed.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        # libpq's keyword/value form, or anything else a setting was given.
        return _KEYWORD_SECRET.sub(lambda m: f"{m['key']}{m['equals']}{MASK}", url)
    address, question, query = rest.partition("?")
    # The last "@" before the query ends the user part: a password with an unencoded "/"
    # or "@" is still masked whole. "scheme:///…" has no user part (SQLite paths).
    user_part, at, host_part = address.rpartition("@")
    if at and ":" in user_part and not address.startswith("/"):
        address = f"{user_part.partition(':')[0]}:{MASK}@{host_part}"
    if question:
        query, hash_, fragment = query.partition("#")
        parameters = parse_qsl(query, keep_blank_values=True)
        if any(key in SECRET_URL_PARAMETERS for key, _ in parameters):
            query = urlencode(
                [
                    (key, MASK if key in SECRET_URL_PARAMETERS else value)
                    for key, value in parameters
                ],
                safe="*",
            )
        query = f"{query}{hash_}{fragment}"
    return f"{scheme}{separator}{address}{question}{query}"


def url_secrets(url: str) -> set[str]:
    """The secrets written in ``url`` (as written, and percent-decoded)."""
    found: set[str] = set()
    if "://" not in url:
        for match in _KEYWORD_SECRET.finditer(url):
            value = match["value"]
            found.add(value)
            if value.startswith("'"):
                found.add(re.sub(r"\\(.)", r"\1", value.strip("'")))
        found.discard("")
        return found
    address, _, query = url.partition("://")[2].partition("?")
    user_part, at, _ = address.rpartition("@")
    if at and ":" in user_part and not address.startswith("/"):
        found.add(user_part.partition(":")[2])
    for key, value in parse_qsl(query.partition("#")[0], keep_blank_values=True):
        if key in SECRET_URL_PARAMETERS:
            found.add(value)
    found |= {unquote(secret) for secret in found}
    found.discard("")
    return found


def redacted_message(message: str, url: str) -> str:
    """A driver's ``message`` about ``url``, with the URL and its secrets masked.

    libpq quotes what it cannot parse, and that can be the password (an invalid
    percent-encoding in it, a space) or the whole URL.
    """
    message = message.replace(url, redacted_url(url))
    # Longest first, so that a secret containing another is masked whole.
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        message = message.replace(secret, MASK)
    return message
