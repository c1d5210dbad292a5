"""Value objects shared by commands and events, with the API's validation rules (docs/api.md).

Field names equal the proto field names, so a pydantic error location is already the
path a client sees in ``google.rpc.BadRequest``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)

from domain.ids import new_uuid

NANOS_PER_UNIT = 1_000_000_000
CURRENCY_CODE_PATTERN = r"[A-Z]{3}"
MAX_INT64 = 2**63 - 1
MAX_UNIT_PRICE_UNITS = 1_000_000_000


def _matching(pattern: str) -> str:
    """``pattern`` as a whole-string rule for ``StringConstraints``: pydantic searches with
    it (Rust's regex, where ``$`` is the end of the text, never a newline before it)."""
    return f"^{pattern}$"


UUID_PATTERN = _matching(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
PRODUCT_ID_PATTERN = _matching(r"[A-Za-z0-9._-]{1,64}")
CURRENCY_CODE_RULE = _matching(CURRENCY_CODE_PATTERN)
COUNTRY_CODE_RULE = _matching(r"[A-Z]{2}")
NOT_BLANK = r"[^\s\x1c-\x1f\p{Cc}\p{Cf}]"
"""Found anywhere in a text that is not blank: a character that shows. Not white space
(Rust's ``\\s`` is Unicode's, which leaves out the four separators U+001C to U+001F that
Python's ``str.strip`` also takes), and not a control or format character: a recipient
of one zero-width space (U+200B) or byte-order mark is as empty on a label as one of
spaces."""

PATTERN_VIOLATIONS: Mapping[str, tuple[str, str]] = {
    UUID_PATTERN: ("uuid", "must be a UUID in the 36-character hyphenated form"),
    PRODUCT_ID_PATTERN: ("product_id", "must be 1 to 64 characters of A-Z a-z 0-9 . _ -"),
    CURRENCY_CODE_RULE: ("currency_code", "must be an ISO 4217 code (3 capital letters)"),
    COUNTRY_CODE_RULE: ("country_code", "must be an ISO 3166-1 code (2 capital letters)"),
    NOT_BLANK: ("blank", "is required and must not be blank"),
}
"""Each pattern a value must match → the violation reported when it does not (its type and
description), for ``domain.violations``. The patterns are checked by pydantic itself, in
Rust: as Python validators, the four patterns, the blank checks and the lower-casing of a
CreateOrder's ten values took about a third of its validation."""


def _new_id_if_empty(value: object) -> object:
    return new_uuid() if value == "" else value


Uuid = Annotated[str, StringConstraints(pattern=UUID_PATTERN, to_lower=True)]
"""A UUID in the 36-character hyphenated form, any case; stored in lower case."""

CommandId = Annotated[Uuid, BeforeValidator(_new_id_if_empty)]
"""A UUID, or empty to let the server pick one."""

ProductId = Annotated[str, StringConstraints(pattern=PRODUCT_ID_PATTERN)]

RequiredText = Annotated[str, StringConstraints(max_length=200, pattern=NOT_BLANK)]
OptionalText = Annotated[str, StringConstraints(max_length=200)]


class ValueObject(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Money(ValueObject):
    """An amount in one currency, as ``google.type.Money`` (non-negative here).

    Unbounded but for int64, so that an order's total can reach what its items allow.
    """

    currency_code: Annotated[str, StringConstraints(pattern=CURRENCY_CODE_RULE)]
    units: Annotated[int, Field(ge=0, le=MAX_INT64)] = 0
    nanos: Annotated[int, Field(ge=0, le=999_999_999)] = 0

    @property
    def total_nanos(self) -> int:
        return self.units * NANOS_PER_UNIT + self.nanos


class _UnitPriceRules(Money):
    units: Annotated[int, Field(ge=0, le=MAX_UNIT_PRICE_UNITS)] = 0


def _within_unit_price_bounds(value: object) -> object:
    # A dict first, as every request's price is: ``isinstance`` of a model class runs
    # pydantic's metaclass check (ABCMeta's), about 1,500 instructions under callgrind.
    units = (
        value.get("units", 0)
        if isinstance(value, dict)
        else value.units
        if isinstance(value, Money)
        else None
    )
    if isinstance(units, int) and 0 <= units <= MAX_UNIT_PRICE_UNITS:
        # Within bounds (nearly every request): Money's own validation does the rest, and
        # validating the price twice would double its cost.
        return value
    # Validated as a whole, so that a bad ``units`` is reported along with any other bad
    # field of the price (pydantic nests the locations under the field's own path).
    if isinstance(value, Money | dict):
        _UnitPriceRules.model_validate(value.model_dump() if isinstance(value, Money) else value)
    return value


UnitPrice = Annotated[Money, BeforeValidator(_within_unit_price_bounds)]
"""The price of one unit of an item: at most a billion units of its currency."""


class Address(ValueObject):
    recipient: RequiredText
    line1: RequiredText
    line2: OptionalText = ""
    city: RequiredText
    region: OptionalText = ""
    postal_code: OptionalText = ""
    country_code: Annotated[str, StringConstraints(pattern=COUNTRY_CODE_RULE)]


class OrderItem(ValueObject):
    product_id: ProductId
    quantity: Annotated[int, Field(ge=1, le=10_000)]
    unit_price: UnitPrice

    @property
    def line_total_nanos(self) -> int:
        return self.quantity * self.unit_price.total_nanos
