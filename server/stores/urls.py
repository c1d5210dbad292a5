"""Store URLs as they may be shown: in log lines and error messages, never with a secret."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode

from domain.errors import ConfigurationError

SECRET_URL_PARAMETERS = frozenset({"password", "sslpassword"})
"""Query parameters of a store URL that hold a secret (libpq accepts both), matched in any
case: libpq refuses ``PASSWORD=`` and quotes the URL, value and all, in its complaint."""
MASK = "***"

_KEYWORD_SECRET = re.compile(
    r"\b(?P<key>(?:ssl)?password)(?P<equals>\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'?|\S*)",
    re.IGNORECASE,
)
"""A secret in libpq's keyword/value form (``host=db password='s e cret'``): a single-quoted
value (with backslash escapes) or one without spaces."""


_SCHEME_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/*")
"""How a mistyped URL may still begin (``postgresql:/``, ``postgres:``)."""


def _guessed_credentials(text: str) -> tuple[str, str, str] | None:
    """In what is not a well-formed ``scheme://user:password@…`` URL (``postgresql:/u:pw@h``,
    ``postgresql//u:pw@h``, ``postgresql:///u:pw@h``), the credentials it may still hold:
    (what comes before the password, the password, what follows it from the last "@");
    None when nothing before the last "@" has a ":" (but for the end of a scheme-like
    start followed by "/")."""
    head, at, tail = text.rpartition("@")
    if not at:
        return None
    start = _SCHEME_LIKE.match(head)
    prefix = start.group() if start else ""
    user, colon, password = head[len(prefix) :].partition(":")
    if colon:
        return f"{prefix}{user}:", password, f"@{tail}"
    if prefix.endswith(":"):
        # No scheme after all, or none before the user: ``user:password@host``.
        return prefix, head[len(prefix) :], f"@{tail}"
    return None


def _may_hide_credentials(url: str) -> bool:
    """Whether ``url``, a ``scheme://`` URL without a user part, may still hold credentials
    before an "@" (``postgresql:///u:pw@h``); never a SQLite path, whose file name may
    hold ":" and "@"."""
    scheme, separator, _ = url.partition("://")
    return bool(separator) and user_part(url) is None and scheme.lower() != "sqlite"


class StoreURLError(ConfigurationError):
    """A store URL that cannot be used; its message shows the URL redacted."""


def user_part(url: str) -> str | None:
    """The user part of a ``scheme://user:password@host…`` URL as written, before its
    "@"; None when there is none (no "@", or "scheme:///…", as SQLite paths are).

    A password may hold an unencoded "/", "?", "#" or "@", which a URL parser would take
    for the end of the user part, and a query may hold an "@" of its own: the user part
    ends at the last "@" before the query, taken to begin at the first "?" after a "/"
    (else at the last "@" of all). So ``u:p@ss/w@host/db`` has the user part ``u:p@ss/w``
    (and is refused), while ``u:pw@host/db?application_name=a@b`` has ``u:pw``. Taking too
    much for the user part masks too much; taking too little would show the password.
    """
    _, separator, rest = url.partition("://")
    if not separator or rest.startswith("/"):
        return None
    ats = [index for index, character in enumerate(rest) if character == "@"]
    if not ats:
        return None
    slash = rest.find("/")
    query = rest.find("?", slash) if slash >= 0 else -1
    before_query = [index for index in ats if query < 0 or index < query]
    return rest[: (before_query or ats)[-1]]


def redacted_url(url: str) -> str:
    """``url`` without its password, in the user part or the query, fit for a log line.

    Never fails, whatever ``url`` holds: it is called to report URLs that are malformed.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        # libpq's keyword/value form, a mistyped URL, or anything else a setting was given.
        return _masked_guess(_KEYWORD_SECRET.sub(lambda m: f"{m['key']}{m['equals']}{MASK}", url))
    user = user_part(url)
    if user is not None:
        rest = rest[len(user) + 1 :]
        user = f"{user.partition(':')[0]}:{MASK}@" if ":" in user else f"{user}@"
    address, question, query = rest.partition("?")
    if question:
        query, hash_, fragment = query.partition("#")
        parameters = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() in SECRET_URL_PARAMETERS for key, _ in parameters):
            query = urlencode(
                [
                    (key, MASK if key.lower() in SECRET_URL_PARAMETERS else value)
                    for key, value in parameters
                ],
                safe="*",
            )
        query = f"{query}{hash_}{fragment}"
    shown = f"{scheme}{separator}{user or ''}{address}{question}{query}"
    return _masked_guess(shown) if _may_hide_credentials(url) else shown


def _masked_guess(text: str) -> str:
    guessed = _guessed_credentials(text)
    return text if guessed is None else f"{guessed[0]}{MASK}{guessed[2]}"


def url_secrets(url: str) -> set[str]:
    """The secrets written in ``url`` (as written, and percent-decoded)."""
    found: set[str] = set()
    if "://" not in url or _may_hide_credentials(url):
        guessed = _guessed_credentials(url)
        if guessed is not None:
            found.add(guessed[1])
    if "://" not in url:
        for match in _KEYWORD_SECRET.finditer(url):
            value = match["value"]
            found.add(value)
            if value.startswith("'"):
                found.add(re.sub(r"\\(.)", r"\1", value.strip("'")))
        found.discard("")
        return found
    rest = url.partition("://")[2]
    user = user_part(url)
    if user is not None:
        rest = rest[len(user) + 1 :]
        if ":" in user:
            found.add(user.partition(":")[2])
    for key, value in parse_qsl(rest.partition("?")[2].partition("#")[0], keep_blank_values=True):
        if key.lower() in SECRET_URL_PARAMETERS:
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
