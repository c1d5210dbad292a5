"""The formats and blank checks of a command's values, as a client's violations name them."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from pydantic import ValidationError

from domain.commands import CancelOrder, CreateOrder
from domain.fingerprints import fingerprint

CUSTOMER = "0b9a4f7e-53c5-4c64-8e9e-6f1a5c3d2b10"


def _order(**changes: Any) -> dict[str, Any]:
    address = {"recipient": "Ada", "line1": "1 Analytical St", "city": "London"}
    address |= changes.pop("address", {})
    price = {"currency_code": changes.pop("currency_code", "EUR"), "units": 10}
    return {
        "command_id": "",
        "customer_id": CUSTOMER,
        "items": [
            {"product_id": changes.pop("product_id", "p-1"), "quantity": 1, "unit_price": price}
        ],
        "shipping_address": {"country_code": "GB", **address},
        **changes,
    }


def _violations(data: dict[str, Any]) -> dict[tuple[Any, ...], tuple[str, str]]:
    with pytest.raises(ValidationError) as caught:
        CreateOrder.model_validate(data)
    return {tuple(e["loc"]): (e["type"], e["msg"]) for e in caught.value.errors()}


@pytest.mark.parametrize(
    "blank",
    ["", " ", "\t\r\n", "\u2003\u3000", "\x1c", "\x1d\x1e \x1f", "\u200b", "\u200d\ufeff\x00"],
)
def test_a_blank_required_text_is_reported_as_blank(blank: str) -> None:
    # U+001C to U+001F are stripped by Python, though they are not Unicode white space;
    # zero-width characters and controls show nothing either.
    assert _violations(_order(address={"city": blank})) == {
        ("shipping_address", "city"): ("blank", "is required and must not be blank")
    }


@pytest.mark.parametrize("text", [".", " x ", "\x1c\x1dx", "\u200bx", "\u0301"])
def test_text_with_anything_that_shows_is_not_blank(text: str) -> None:
    command = CreateOrder.model_validate(_order(address={"city": text}))
    assert command.shipping_address.city == text


@pytest.mark.parametrize(
    ("changes", "location", "kind", "message"),
    [
        (
            {"customer_id": CUSTOMER + "\n"},
            ("customer_id",),
            "uuid",
            "must be a UUID in the 36-character hyphenated form",
        ),
        (
            {"product_id": "p-1\n"},
            ("items", 0, "product_id"),
            "product_id",
            "must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
        ),
        (
            {"currency_code": "EUR\n"},
            ("items", 0, "unit_price", "currency_code"),
            "currency_code",
            "must be an ISO 4217 code (3 capital letters)",
        ),
        (
            {"address": {"country_code": "GB\n"}},
            ("shipping_address", "country_code"),
            "country_code",
            "must be an ISO 3166-1 code (2 capital letters)",
        ),
        (
            {"address": {"country_code": "gb"}},
            ("shipping_address", "country_code"),
            "country_code",
            "must be an ISO 3166-1 code (2 capital letters)",
        ),
    ],
)
def test_a_format_must_match_the_whole_value(
    changes: dict[str, Any], location: tuple[Any, ...], kind: str, message: str
) -> None:
    # A newline at the end is not "the end of the value" (as ``$`` is in Python's re).
    assert _violations(_order(**changes)) == {location: (kind, message)}


def test_uuids_are_kept_in_lower_case() -> None:
    order_id = "0B9A4F7E-53C5-4C64-8E9E-6F1A5C3D2B10"
    command = CancelOrder.model_validate({"command_id": order_id, "order_id": order_id})
    assert command.order_id == command.command_id == order_id.lower()


@pytest.mark.parametrize("claimed", [True, False])
def test_whether_the_server_chose_the_id_is_decided_by_the_command_id_alone(
    claimed: bool,
) -> None:
    chosen = CreateOrder.model_validate({**_order(), "server_chose_id": claimed})
    sent = CreateOrder.model_validate({**_order(command_id=CUSTOMER), "server_chose_id": claimed})
    assert chosen.server_chose_id and not sent.server_chose_id
    assert chosen.command_id != "" and sent.command_id == CUSTOMER
    # Never part of what a command is compared by on a retry.
    assert "server_chose_id" not in sent.model_dump()


def test_fingerprints_are_those_earlier_releases_recorded() -> None:
    # Stored with every commit: a retry after an upgrade must digest to the same value,
    # or it would be refused as another request reusing the id.
    command = CreateOrder.model_validate(
        {
            "command_id": CUSTOMER,
            "timestamp": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            "customer_id": CUSTOMER.upper(),
            "items": [
                {
                    "product_id": "p-1",
                    "quantity": 2,
                    "unit_price": {"currency_code": "EUR", "units": 3, "nanos": 5},
                }
            ],
            "shipping_address": {"recipient": "A", "line1": "B", "city": "C", "country_code": "GB"},
            "user_id": "u",
        }
    )
    assert fingerprint(command) == (
        "2:4d33a3cfe1a1f60a4173defec8a21137729e71c15a97ed833e57d831f33f1fa0"
    )
