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
ALL_SCOPES = frozenset(
    {SCOPE_ORDERS_WRITE, SCOPE_ORDERS_ADMIN, SCOPE_INVENTORY_WRITE, SCOPE_EVENTS_READ}
)


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return SCOPE_ORDERS_ADMIN in self.scopes


ANONYMOUS = Caller(user_id="", scopes=ALL_SCOPES)
"""Every caller when authentication is off: empty user id, all scopes."""

current_caller: ContextVar[Caller] = ContextVar("current_caller", default=ANONYMOUS)
