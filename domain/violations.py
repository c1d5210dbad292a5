"""Broken validation rules, worded for the client who broke them.

pydantic words its built-in constraints for Python programmers ("List should have at least
1 item after validation, not 0"). A client of the gateway reads these words in a
``google.rpc.BadRequest``, so each built-in constraint the commands use is said again here
in the terms of the API. The rules checked by our own validators already raise
``PydanticCustomError`` with such words and pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from domain.values import PATTERN_VIOLATIONS


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" if number == 1 else f"{number:,} {noun}s"


_WORDING: Mapping[str, Callable[[Mapping[str, Any]], str]] = {
    "missing": lambda _: "is required",
    "too_short": lambda ctx: f"must hold at least {_count(ctx['min_length'], 'item')}",
    "too_long": lambda ctx: f"must hold at most {_count(ctx['max_length'], 'item')}",
    "string_too_long": lambda ctx: f"must be at most {_count(ctx['max_length'], 'character')}",
    "greater_than_equal": lambda ctx: f"must be at least {ctx['ge']:,}",
    "less_than_equal": lambda ctx: f"must be at most {ctx['le']:,}",
}
"""pydantic's error type → our description, from the error's context (its bound)."""


def reworded(error: ValidationError) -> list[InitErrorDetails]:
    """Every violation of ``error``, at its location, described in the API's own words.

    The error's type and context are kept, so that rewording twice changes nothing.
    """
    return [_reworded(detail) for detail in error.errors()]


def _reworded(detail: ErrorDetails) -> InitErrorDetails:
    context = detail.get("ctx") or {}
    kind = detail["type"]
    if kind == "string_pattern_mismatch" and context.get("pattern") in PATTERN_VIOLATIONS:
        # A value's format is a rule of its own (a UUID, a product id): reported as that
        # rule, as it would be by a validator of ours, not as a regular expression.
        kind, message = PATTERN_VIOLATIONS[context["pattern"]]
        context = {}
    else:
        describe = _WORDING.get(kind)
        message = detail["msg"] if describe is None else describe(context)
    # The message is a template formatted with the context: braces are not ours to keep.
    template = message.replace("{", "(").replace("}", ")")
    return {
        "type": PydanticCustomError(kind, template, context or None),
        "loc": detail["loc"],
        "input": detail["input"],
    }
