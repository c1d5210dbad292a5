"""Hostile input: arbitrary messages, unicode edge cases and random bytes.

Whatever a client sends, the answer is a command or INVALID_ARGUMENT naming real fields
(never another error), and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import random
import re
import unicodedata
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.type import money_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from orders.v1 import inventory_command_service_pb2, order_command_service_pb2, types_pb2
from pydantic import ValidationError

from domain.commands import CancelOrder, Command, CreateOrder, RestockProduct
from server.rpc import mapping
from server.rpc.status_mapping import field_path, validation_status
from tests.clients import Clients, address, bad_fields, item, order_request

WAIT = 10
"""Upper bound, in seconds, on waiting for any one answer (never a timing check)."""

# --- strategies ---------------------------------------------------------------------------

EDGE_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\u202eevil\u202c",  # right-to-left override
    "שלום עולם",  # right-to-left script
    "e\u0301\u0301\u0301",  # stacked combining marks
    "\u200d",  # zero-width joiner alone
    "👩‍👩‍👧‍👦",  # one glyph, seven code points
    "\ufeff",  # byte order mark
    "\uffff\U0010ffff",  # noncharacters
    "{}",
    "{0}",
    "%s%n",
    "\\",
    "\r\n",
    "x" * 10_000,
]

# Proto strings are UTF-8: lone surrogates cannot be in them at all.
characters = st.characters(exclude_categories=["Cs"])
any_text = st.one_of(st.sampled_from(EDGE_STRINGS), st.text(characters, max_size=300))
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)


def any_case(text: str, flips: list[bool]) -> str:
    return "".join(c.upper() if n < len(flips) and flips[n] else c for n, c in enumerate(text))


valid_uuids = st.builds(any_case, st.uuids().map(str), st.lists(st.booleans(), max_size=36))
valid_product_ids = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
required_text = st.text(characters, min_size=1, max_size=200).filter(str.strip)
optional_text = st.text(characters, max_size=200)

ADDRESS_FIELDS = ("recipient", "line1", "line2", "city", "region", "postal_code", "country_code")
# Each request is valid but for a few "spoiled" fields, which get hostile values: so the
# examples reach both outcomes, and every rule is tried alone and with others.
VALID: dict[str, st.SearchStrategy[Any]] = {
    "command_id": st.one_of(st.just(""), valid_uuids),
    "customer_id": valid_uuids,
    "order_id": valid_uuids,
    "product_id": valid_product_ids,
    "quantity": st.integers(1, 10_000),
    "restock_quantity": st.integers(1, 1_000_000),
    "currency_code": st.sampled_from(["EUR", "USD", "JPY"]),
    "units": st.integers(0, 1_000_000_000),
    "nanos": st.integers(0, 999_999_999),
    "recipient": required_text,
    "line1": required_text,
    "line2": optional_text,
    "city": required_text,
    "region": optional_text,
    "postal_code": optional_text,
    "country_code": st.from_regex(r"[A-Z]{2}", fullmatch=True),
    "reason": st.text(characters, max_size=500),
}
HOSTILE: dict[str, st.SearchStrategy[Any]] = {
    "command_id": st.one_of(st.uuids().map(lambda u: u.hex), any_text),
    "customer_id": st.one_of(st.uuids().map(lambda u: u.hex), any_text),
    "order_id": st.one_of(st.uuids().map(lambda u: "{" + str(u) + "}"), any_text),
    "product_id": any_text,
    "quantity": st.one_of(st.integers(-2, 10_002), int32),
    "restock_quantity": st.one_of(st.integers(-1, 1_000_001), int32),
    "currency_code": st.one_of(st.sampled_from(["eur", "EURO", ""]), any_text),
    "units": st.one_of(st.integers(-1, 1_000_000_001), int64),
    "nanos": st.one_of(st.integers(-1, 1_000_000_000), int32),
    "country_code": st.one_of(st.sampled_from(["gb", "GBR", ""]), any_text),
    "reason": st.one_of(any_text, st.integers(495, 505).map(lambda n: "r" * n)),
    **{
        name: st.one_of(any_text, st.integers(195, 205).map(lambda n: "a" * n))
        for name in ADDRESS_FIELDS[:-1]
    },
}
STRUCTURE = ["items_count", "duplicate_product", "mixed_currency", "no_unit_price", "no_address"]


def spoiled(names: list[str]) -> st.SearchStrategy[frozenset[str]]:
    return st.frozensets(st.sampled_from(names), max_size=3)


def value(draw: st.DrawFn, name: str, spoil: frozenset[str], key: str | None = None) -> Any:
    return draw((HOSTILE if name in spoil else VALID)[key or name])


@st.composite
def create_requests(draw: st.DrawFn) -> order_command_service_pb2.CreateOrderRequest:
    spoil = draw(spoiled([*VALID.keys() - {"order_id", "reason", "restock_quantity"}, *STRUCTURE]))
    count = draw(st.sampled_from([0, 101]) if "items_count" in spoil else st.integers(1, 4))
    product_ids = (
        draw(st.lists(VALID["product_id"], min_size=count, max_size=count, unique=True))
        if count < 100
        else [f"sku-{n}" for n in range(count)]
    )
    if "duplicate_product" in spoil and count > 1:
        product_ids[-1] = product_ids[0]
    currency = value(draw, "currency_code", frozenset())
    request = order_command_service_pb2.CreateOrderRequest(
        command_id=value(draw, "command_id", spoil), customer_id=value(draw, "customer_id", spoil)
    )
    for product_id in product_ids:
        request.items.add(product_id=product_id, quantity=draw(VALID["quantity"]))
        request.items[-1].unit_price.CopyFrom(
            money_pb2.Money(
                currency_code=currency,
                units=draw(VALID["units"]),
                nanos=draw(VALID["nanos"]),
            )
        )
    if count:
        # The per-item rules are tried on one item: a random one.
        target = request.items[draw(st.integers(0, count - 1))]
        if "product_id" in spoil:
            target.product_id = draw(HOSTILE["product_id"])
        if "quantity" in spoil:
            target.quantity = draw(HOSTILE["quantity"])
        for name in ("currency_code", "units", "nanos"):
            if name in spoil:
                setattr(target.unit_price, name, draw(HOSTILE[name]))
        if "mixed_currency" in spoil:
            request.items[-1].unit_price.currency_code = "XTS"
        if "no_unit_price" in spoil:
            target.ClearField("unit_price")
    if "no_address" not in spoil:
        request.shipping_address.CopyFrom(
            types_pb2.Address(**{name: value(draw, name, spoil) for name in ADDRESS_FIELDS})
        )
    return request


@st.composite
def cancel_requests(draw: st.DrawFn) -> order_command_service_pb2.CancelOrderRequest:
    spoil = draw(spoiled(["command_id", "order_id", "reason"]))
    return order_command_service_pb2.CancelOrderRequest(
        command_id=value(draw, "command_id", spoil),
        order_id=value(draw, "order_id", spoil),
        reason=value(draw, "reason", spoil),
    )


@st.composite
def restock_requests(draw: st.DrawFn) -> inventory_command_service_pb2.RestockProductRequest:
    spoil = draw(spoiled(["command_id", "product_id", "quantity"]))
    return inventory_command_service_pb2.RestockProductRequest(
        command_id=value(draw, "command_id", spoil),
        product_id=value(draw, "product_id", spoil),
        quantity=value(draw, "quantity", spoil, key="restock_quantity"),
    )


# --- properties ---------------------------------------------------------------------------

PATH_PART = re.compile(r"(\w+)(?:\[(\d+)\])?")
PYDANTIC_WORDING = re.compile(r"should|Field required|after validation|Input|String|List")
"""pydantic's own phrasing of a constraint, which must not reach a client."""


def names_a_field(message: Message, path: str) -> bool:
    """``items[2].unit_price.currency_code`` names a field that ``message`` can hold."""
    current: Any = message
    for part in path.split("."):
        match = PATH_PART.fullmatch(part)
        if match is None or current is None:
            return False
        name, index = match.group(1), match.group(2)
        field = current.DESCRIPTOR.fields_by_name.get(name)
        if field is None:
            return False
        value = getattr(current, name)
        if index is not None:
            if not field.is_repeated or int(index) >= len(value):
                return False
            value = value[int(index)]
        elif field.is_repeated:
            value = None  # the list as a whole: nothing further to name
        current = value if field.message_type is not None else None
    return True


def maps_or_is_invalid_argument(
    command_type: type[Command], request: Message, data: dict[str, Any]
) -> Command | None:
    # Identity and authority come from credentials: the body's mapping never holds them.
    assert not {"user_id", "by_admin", "correlation_id", "timestamp"} & data.keys()
    try:
        command = command_type.model_validate({**data, "user_id": "caller", "correlation_id": ""})
    except ValidationError as error:
        event("INVALID_ARGUMENT")
        status = validation_status(error)
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.errors()
        for detail in error.errors():
            path = field_path(detail["loc"])
            assert names_a_field(request, path), path
            assert not PYDANTIC_WORDING.search(detail["msg"]), detail["msg"]
        return None
    event("mapped to a command")
    return command


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(create_requests())
def test_any_create_order_request_maps_or_is_invalid_argument(
    request: order_command_service_pb2.CreateOrderRequest,
) -> None:
    command = maps_or_is_invalid_argument(CreateOrder, request, mapping.create_order_input(request))
    if isinstance(command, CreateOrder):
        assert command.customer_id == request.customer_id.lower()
        assert [i.product_id for i in command.items] == [i.product_id for i in request.items]
        assert command.shipping_address.recipient == request.shipping_address.recipient
        assert command.user_id == "caller"


@settings(max_examples=200, deadline=None)
@given(cancel_requests())
def test_any_cancel_order_request_maps_or_is_invalid_argument(
    request: order_command_service_pb2.CancelOrderRequest,
) -> None:
    command = maps_or_is_invalid_argument(CancelOrder, request, mapping.cancel_order_input(request))
    if isinstance(command, CancelOrder):
        assert command.order_id == request.order_id.lower()
        assert command.reason == request.reason
        assert not command.by_admin


@settings(max_examples=200, deadline=None)
@given(restock_requests())
def test_any_restock_product_request_maps_or_is_invalid_argument(
    request: inventory_command_service_pb2.RestockProductRequest,
) -> None:
    command = maps_or_is_invalid_argument(
        RestockProduct, request, mapping.restock_product_input(request)
    )
    if isinstance(command, RestockProduct):
        assert (command.product_id, command.quantity) == (request.product_id, request.quantity)


# --- unicode edge cases over the wire -----------------------------------------------------


def shows(text: str) -> bool:
    """Whether ``text`` is not blank, as ``domain.values.NOT_BLANK`` says: it holds a
    character that is neither white space nor a control or format character."""
    return any(not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf") for c in text)


@pytest.mark.parametrize("text", [s for s in EDGE_STRINGS if shows(s) and len(s) <= 200], ids=repr)
async def test_unicode_edge_cases_are_stored_and_streamed_exactly(
    clients: Clients, text: str
) -> None:
    await clients.restock("sku-1", 1)
    request = order_request(item("sku-1"))
    request.shipping_address.CopyFrom(address(recipient=text, line2=text, region=text))
    created = await clients.create(request)
    shipped_to = created[0].order_created.shipping_address
    assert (shipped_to.recipient, shipped_to.line2, shipped_to.region) == (text, text, text)

    cancelled = await clients.cancel(created[0].order_created.order_id, reason=text)
    assert cancelled[0].order_cancelled.reason == text


@pytest.mark.parametrize(
    "product_id", ["sku\x00", "sku\u0301", "\uff53\uff4b\uff55", "sku\u202e", "\U0001f600"]
)
async def test_unicode_in_a_product_id_is_invalid_argument(
    clients: Clients, product_id: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await clients.restock(product_id, 1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == ["product_id"]


# --- random bytes -------------------------------------------------------------------------

METHODS = [
    "/orders.v1.OrderCommandService/CreateOrder",
    "/orders.v1.OrderCommandService/CancelOrder",
    "/orders.v1.InventoryCommandService/RestockProduct",
    "/orders.v1.EventStreamService/Subscribe",
]

CRAFTED = [
    b"",
    b"\x0a",  # field 1, length-delimited, length missing
    b"\x0a\x05abc",  # length beyond the end
    b"\x0a\xff\xff\xff\xff\x0f",  # length of 4 GiB
    b"\x0a\x02\xc3\x28",  # a string that is not UTF-8
    b"\x08" + b"\xff" * 11,  # varint longer than 10 bytes
    b"\x0f",  # wire type 7 does not exist
    b"\x00",  # field number 0
    b"\x1a\x80\x80\x80\x80\x10",  # nested message with a huge length
    b"\x1a\x02\x1a\x00" * 1000,  # repeated nested messages
    b"\x22" + b"\x7f" + b"\x1a\x7d" * 64,  # nesting within nesting
]


def random_messages(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice([1, 2, 3, 8, 64, 512, 4096])) for _ in range(count)]


async def answer(channel: grpc.aio.Channel, method: str, body: bytes) -> grpc.StatusCode:
    send: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
        method, request_serializer=None, response_deserializer=None
    )
    call = send(body, timeout=WAIT)
    try:
        async with asyncio.timeout(WAIT):
            # Bytes that happen to parse into a valid subscription stream a first message.
            await call.read()
    except grpc.aio.AioRpcError as error:
        return error.code()
    finally:
        call.cancel()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.rpartition("/")[2])
async def test_random_bytes_are_answered_and_the_server_keeps_serving(
    clients: Clients, method: str
) -> None:
    answered: dict[grpc.StatusCode, int] = {}
    for body in CRAFTED + random_messages(seed=len(method), count=100):
        code = await answer(clients.channel, method, body)
        answered[code] = answered.get(code, 0) + 1
    allowed = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL}
    if method.endswith("/Subscribe"):
        allowed.add(grpc.StatusCode.OK)
    assert set(answered) <= allowed, answered
    assert answered.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0

    health = health_pb2_grpc.HealthStub(clients.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    restocked = await clients.restock("sku-after", 1)
    assert restocked[0].event_type == "ProductRestocked"


def test_an_order_of_very_many_items_is_checked_only_up_to_one_past_the_limit() -> None:
    data = {
        "customer_id": "not a uuid",
        "items": [{"product_id": "", "quantity": 0}] * 20_000,
        "shipping_address": {},
    }
    with pytest.raises(ValidationError) as refused:
        CreateOrder.model_validate(data)
    paths = {field_path(error["loc"]) for error in refused.value.errors()}
    assert {"customer_id", "items", "items[0].product_id", "items[100].quantity"} <= paths
    assert "items[101].product_id" not in paths


async def test_a_mebibyte_of_empty_items_is_refused_and_the_server_keeps_serving(
    clients: Clients,
) -> None:
    # Field 3 (items), an empty OrderItem, half a million times: 1 MB on the wire.
    body = order_request().SerializeToString() + b"\x1a\x00" * 500_000
    code = await answer(clients.channel, "/orders.v1.OrderCommandService/CreateOrder", body)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    health = health_pb2_grpc.HealthStub(clients.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
