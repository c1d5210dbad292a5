"""Commands: requests to change state, named in the imperative.

A command that exists is well-formed: every validation rule of the API (docs/api.md) is
checked when it is built, and every violation is reported at once in one
``pydantic.ValidationError`` whose locations are the proto field paths and whose messages
are worded for the client (``domain.violations``).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from domain.ids import new_uuid
from domain.values import (
    CURRENCY_CODE_PATTERN,
    Address,
    CommandId,
    OrderItem,
    ProductId,
    Uuid,
)
from domain.violations import reworded


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Command(BaseModel):
    """Base of every command: who sent it, when, and its idempotency key.

    ``user_id`` is the authenticated caller (empty when anonymous); it is set by the
    server from credentials, never from a request body.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    command_id: CommandId = Field(default_factory=new_uuid)
    timestamp: dt.datetime = Field(default_factory=_utcnow)
    user_id: str = ""
    correlation_id: str = ""

    server_chose_id: bool = Field(default=False, exclude=True, repr=False)
    """The caller sent no command_id: nothing can have been recorded under this one.

    Decided by validation from the input's ``command_id``, whatever the input says of it;
    left out of ``model_dump``, so never part of a command's fingerprint. A field, not a
    private attribute: pydantic initialises private attributes in Python for every model
    built, which took about a third of a CreateOrder's validation.
    """

    @model_validator(mode="wrap")
    @classmethod
    def _validate(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        if isinstance(data, dict):
            data = {**data, "server_chose_id": data.get("command_id", "") == ""}
        try:
            return handler(data)
        except ValidationError as error:
            raise _merged(cls.__name__, reworded(error)) from None

    IDEMPOTENCY_EXCLUDED: ClassVar[set[str]] = {"command_id", "timestamp", "correlation_id"}
    """Fields left out when deciding whether two commands with one ``command_id`` are
    "the same request": everything else must match."""


MAX_ITEMS = 100
CHECKED_ITEMS = MAX_ITEMS + 1
"""Of an order with too many items, the items checked one by one: the first ones, one
more than an order may hold. Checking every item of a 1 MiB request (half a million
empty items) took the event loop 54 s and 5.7 GB to report its 1.5 million violations."""


class CreateOrder(Command):
    customer_id: Uuid
    # At most MAX_ITEMS, checked by ``_report_every_violation``: pydantic's own
    # ``max_length`` stops at the list's length, leaving the items' violations unreported.
    items: Annotated[list[OrderItem], Field(min_length=1)]
    shipping_address: Address

    @model_validator(mode="wrap")
    @classmethod
    def _report_every_violation(
        cls, data: Any, handler: ModelWrapValidatorHandler[CreateOrder]
    ) -> CreateOrder:
        # Rules across items are checked on the raw input so that they are reported
        # together with field errors instead of only after those are fixed.
        too_many = _too_many_items(data)
        if too_many:
            data = {**data, "items": data["items"][:CHECKED_ITEMS]}
        cross_item = _cross_item_errors(data)
        try:
            command = handler(data)
        except ValidationError as error:
            field_errors = reworded(error)
            # One violation per path: a malformed value is not also reported as inconsistent.
            reported = {tuple(e["loc"]) for e in field_errors}
            extra = [e for e in cross_item if tuple(e["loc"]) not in reported]
            raise _merged(cls.__name__, too_many + field_errors + extra) from None
        if too_many or cross_item:
            raise _merged(cls.__name__, too_many + cross_item)
        return command


class CancelOrder(Command):
    order_id: Uuid
    reason: Annotated[str, StringConstraints(max_length=500)] = ""
    by_admin: bool = False
    """The caller holds ``orders:admin`` (or authentication is off): may cancel any order."""

    IDEMPOTENCY_EXCLUDED = Command.IDEMPOTENCY_EXCLUDED | {"by_admin"}


class RestockProduct(Command):
    product_id: ProductId
    quantity: Annotated[int, Field(ge=1, le=1_000_000)]


def _too_many_items(data: Any) -> list[InitErrorDetails]:
    items = data.get("items") if isinstance(data, dict) else None
    if not isinstance(items, list) or len(items) <= MAX_ITEMS:
        return []
    # pydantic's own error, as ``max_length`` would have raised it, in the API's words.
    context = {"field_type": "List", "max_length": MAX_ITEMS, "actual_length": len(items)}
    too_long: InitErrorDetails = {
        "type": "too_long",
        "loc": ("items",),
        "input": items,
        "ctx": context,
    }
    return reworded(_merged("CreateOrder", [too_long]))


def _cross_item_errors(data: Any) -> list[InitErrorDetails]:
    items = data.get("items") if isinstance(data, dict) else None
    if not isinstance(items, list) or len(items) < 2:
        # One item cannot repeat a product or mix currencies (most orders have one).
        return []
    errors: list[InitErrorDetails] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        product_id = item.get("product_id") if isinstance(item, dict) else None
        if isinstance(product_id, str) and product_id:
            if product_id in seen:
                errors.append(
                    _error(
                        ("items", index, "product_id"),
                        "duplicate_product",
                        "product appears more than once in the order",
                        product_id,
                    )
                )
            seen.add(product_id)
    currencies = [_currency_of(item) for item in items]
    first = next((c for c in currencies if c is not None), None)
    for index, currency in enumerate(currencies):
        if currency is not None and currency != first:
            errors.append(
                _error(
                    ("items", index, "unit_price", "currency_code"),
                    "mixed_currency",
                    f"all items must be priced in one currency ({first})",
                    currency,
                )
            )
            break
    return errors


def _currency_of(item: Any) -> str | None:
    """The item's currency if it is well-formed: a malformed one is reported as such, and
    must neither set the order's currency nor hide a later item's mismatch."""
    price = item.get("unit_price") if isinstance(item, dict) else None
    if isinstance(price, dict):
        code = price.get("currency_code")
        if isinstance(code, str) and re.fullmatch(CURRENCY_CODE_PATTERN, code):
            return code
    return None


def _error(loc: tuple[str | int, ...], kind: str, message: str, value: Any) -> InitErrorDetails:
    return {"type": PydanticCustomError(kind, message), "loc": loc, "input": value}


def _merged(title: str, errors: list[InitErrorDetails]) -> ValidationError:
    return ValidationError.from_exception_data(title, errors)
