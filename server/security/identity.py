"""Who is calling: the scopes, the authenticated caller.

The auth interceptor sets ``current_caller`` for the duration of each call; servicers
read it to fill the command's ``user_id``. Nothing in a request body can set it.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

SCOPE_ORDERS_WRITE = "orders:write"
SCOPE_ORDERS_ADMIN = "orders:admin"
SCOPE_INVENTORY_WRITE = "inventory:write"
SCOPE_EVENTS_READ = "events:read"
SCOPE_EVENTS_ADMIN = "events:admin"
ALL_SCOPES = frozenset(
    {
        SCOPE_ORDERS_WRITE,
        SCOPE_ORDERS_ADMIN,
        SCOPE_INVENTORY_WRITE,
        SCOPE_EVENTS_READ,
        SCOPE_EVENTS_ADMIN,
    }
)


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: str
    scopes: frozenset[str]
    expires_at: float | None = None
    """When the credentials this caller presented stop being valid (seconds since the
    epoch, clock skew allowed for): a JWT's; None for those that do not expire."""

    @property
    def is_admin(self) -> bool:
        return SCOPE_ORDERS_ADMIN in self.scopes


ANONYMOUS = Caller(user_id="", scopes=ALL_SCOPES)
"""Every caller when authentication is off: empty user id, all scopes."""

MAX_USER_ID_LENGTH = 256


def is_user_id(value: str) -> bool:
    """Whether ``value`` may name an authenticated caller: 1 to 256 printable characters,
    not only spaces. The id is written into every event the caller causes and into the
    access log, so nothing in it may be invisible (a zero-width space), reorder the text
    around it (a right-to-left override) or break a line (``str.isprintable``), and it
    cannot be empty, which is how events and logs tell an anonymous caller."""
    return 0 < len(value) <= MAX_USER_ID_LENGTH and value.isprintable() and not value.isspace()


current_caller: ContextVar[Caller] = ContextVar("current_caller", default=ANONYMOUS)
