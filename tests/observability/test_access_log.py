"""The access log: one line per RPC, with ids and caller, never a credential."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from orders.v1 import consumer_group_service_pb2, consumer_group_service_pb2_grpc

from domain.ports import Commit, RecordedEvent
from server import app
from server.observability import access_log
from server.observability.access_log import AccessLog
from server.observability.hooks import RpcOutcome
from server.observability.interceptor import ObservabilityInterceptor
from server.observability.logs import JsonFormatter, configure_logging, sole_gateway_handler
from server.rpc.last_resort import LastResortInterceptor
from server.rpc.method_handlers import Interceptors
from server.stores.memory import MemoryEventStore
from tests.clients import item, order_request
from tests.observability_support import TOKEN, USER, FrozenStore, rpc_error, running
from tests.subscription_support import until

ACCESS = "order_gateway.access"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == ACCESS]


def fields(record: logging.LogRecord) -> dict[str, object]:
    value = record.__dict__["fields"]
    assert isinstance(value, dict)
    return value


async def test_one_line_per_rpc_with_method_code_duration_ids_and_user(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    command_id = str(uuid.uuid4())
    async with running(secured=True) as (_, clients):
        await clients.restock(
            "sku-1",
            5,
            command_id=command_id,
            metadata=(*AUTH, ("x-request-id", "req-42"), ("x-correlation-id", "checkout-7")),
        )
        reused = await rpc_error(
            clients.create(order_request(item("sku-1", 1), command_id=command_id), metadata=AUTH)
        )
        assert reused.code() == grpc.StatusCode.ALREADY_EXISTS

    first, second = access_lines(caplog)
    assert first.levelno == logging.INFO
    assert fields(first) == {
        "method": "/orders.v1.InventoryCommandService/RestockProduct",
        "code": "OK",
        "duration_ms": fields(first)["duration_ms"],
        "request_id": "req-42",
        "correlation_id": "checkout-7",
        "user_id": USER,
        "peer": fields(first)["peer"],
    }
    duration = fields(first)["duration_ms"]
    assert isinstance(duration, float) and duration > 0
    assert "127.0.0.1" in str(fields(first)["peer"])
    assert first.getMessage().startswith("/orders.v1.InventoryCommandService/RestockProduct OK ")
    assert "request_id=req-42 correlation_id=checkout-7 user=checkout-service" in (
        first.getMessage()
    )

    # The same command_id with another request: the client's error, logged at INFO.
    # Without x-correlation-id the command_id correlates; the request id is generated.
    assert fields(second)["code"] == "ALREADY_EXISTS"
    assert fields(second)["correlation_id"] == command_id
    assert len(str(fields(second)["request_id"])) == 32
    assert second.levelno == logging.INFO


async def test_a_call_that_named_no_ids_is_logged_under_its_events_correlation_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    named = str(uuid.uuid4()).upper()
    async with running() as (_, clients):
        (chosen,) = await clients.restock("sku-1", 5)
        (own,) = await clients.restock("sku-1", 5, command_id=named)
        invalid = await rpc_error(clients.restock("sku-1", 0, command_id=named))
        assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT

    first, second, refused = access_lines(caplog)
    # No command_id and no x-correlation-id: the id the server chose, as in the events.
    assert fields(first)["correlation_id"] == chosen.correlation_id == chosen.command_id
    assert chosen.command_id
    # A command_id in capitals: as the events have it, in lower case.
    assert fields(second)["correlation_id"] == own.correlation_id == named.lower()
    # A request refused before any command was built: its command_id as sent.
    assert fields(refused)["correlation_id"] == named


async def test_refused_calls_are_logged_and_tokens_never_are(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(secured=True) as (_, clients):
        await clients.restock("sku-1", 5, metadata=AUTH)
        wrong = (("authorization", f"Bearer {TOKEN}-but-wrong"),)
        error = await rpc_error(clients.restock("sku-1", 5, metadata=wrong))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED

    ok, refused = access_lines(caplog)
    assert fields(ok)["code"] == "OK"
    assert fields(refused)["code"] == "UNAUTHENTICATED"
    assert fields(refused)["user_id"] == ""
    formatter = JsonFormatter()
    for record in caplog.records:
        assert TOKEN not in formatter.format(record)
        assert TOKEN not in record.getMessage()


async def test_a_call_refused_for_a_missing_scope_is_logged_with_its_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    async with running(secured=True) as (_, clients):
        groups = consumer_group_service_pb2_grpc.ConsumerGroupServiceStub(clients.channel)
        request = consumer_group_service_pb2.CreateConsumerGroupRequest(name="g")
        # The token's caller may read events, not manage groups (events:admin).
        error = await rpc_error(groups.CreateConsumerGroup(request, metadata=AUTH))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    (refused,) = access_lines(caplog)
    assert fields(refused)["code"] == "PERMISSION_DENIED"
    assert fields(refused)["user_id"] == USER


async def test_a_request_id_that_could_forge_log_lines_is_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    forged = "x code=OK user=admin"
    async with running() as (_, clients):
        await clients.restock("sku-1", 5, metadata=(("x-request-id", forged),))
    (line,) = access_lines(caplog)
    assert fields(line)["request_id"] != forged
    assert "user=admin" not in line.getMessage()


async def test_a_correlation_id_that_could_forge_fields_is_quoted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    forged = "x user=root peer=ipv4:6.6.6.6:1"
    async with running(secured=True) as (_, clients):
        await clients.restock("sku-1", 5, metadata=(*AUTH, ("x-correlation-id", forged)))
    (line,) = access_lines(caplog)
    assert fields(line)["correlation_id"] == forged  # as sent, in the JSON fields
    assert line.getMessage().endswith(
        f'correlation_id="{forged}" user={USER} peer={fields(line)["peer"]}'
    )


async def test_a_command_id_with_line_breaks_of_unicode_cannot_break_the_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # JSON escapes only the ASCII controls: a line separator, a C1 control and a
    # right-to-left override went into the text line raw, and readers that split lines
    # by Unicode's rules saw a forged second line.
    caplog.set_level(logging.INFO, logger=ACCESS)
    sent = "x\u2028\u0085RestockProduct OK user=admin\u202e\U000e0001"
    async with running() as (_, clients):
        error = await rpc_error(clients.restock("sku-1", 5, command_id=sent))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    (line,) = access_lines(caplog)
    message = line.getMessage()
    assert message.isprintable()
    assert '"x\\u2028\\u0085RestockProduct OK user=admin\\u202e\\udb40\\udc01"' in message
    assert fields(line)["correlation_id"] == sent


async def test_a_correlation_id_of_a_lone_dash_is_not_read_as_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # "-" stands for an empty value (an anonymous caller's user): a value that is "-"
    # itself is quoted, as a user named "-" (a JWT's sub) would be.
    caplog.set_level(logging.INFO, logger=ACCESS)
    async with running() as (_, clients):
        await clients.restock("sku-1", 5, metadata=(("x-correlation-id", "-"),))
        await clients.restock("sku-1", 5)
    dashed, generated = access_lines(caplog)
    assert 'correlation_id="-" user=- ' in dashed.getMessage()
    assert "correlation_id=- " not in generated.getMessage()


class BrokenStore(MemoryEventStore):
    async def append(self, commit: Commit) -> list[RecordedEvent]:
        raise RuntimeError("disk on fire")


async def test_server_faults_are_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    async with running(store=BrokenStore()) as (_, clients):
        error = await rpc_error(clients.restock("sku-1", 5))
        assert error.code() == grpc.StatusCode.INTERNAL
    (line,) = access_lines(caplog)
    assert line.levelno == logging.WARNING
    assert fields(line)["code"] == "INTERNAL"


class GoneClientContext:
    """A servicer context whose client went away: grpc can start no send on the call."""

    def __init__(self) -> None:
        self.aborted: list[grpc.Status] = []

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def code(self) -> None:
        return None

    async def read(self) -> object:
        return object()

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.aborted.append(status)
        raise grpc.aio.InternalError('Failed "execute_batch"')


async def test_a_call_whose_client_left_while_it_was_refused_is_cancelled_not_a_fault(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A refusal (an invalid request) whose client cancels, or whose deadline passes, just
    # before it is sent: grpc cannot send it, and raises InternalError.
    async def refusing(request: object, context: GoneClientContext) -> None:
        await context.abort_with_status(grpc.Status())

    outcomes: list[RpcOutcome] = []
    handler = await observed(grpc.unary_unary_rpc_method_handler(refusing), outcomes)
    # Served as a client-streaming method (``server.rpc.request_reading``).
    assert handler is not None and handler.stream_unary is not None
    context = GoneClientContext()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(grpc.aio.InternalError):
        await handler.stream_unary(iter(()), context)  # type: ignore[arg-type,misc]
    assert len(context.aborted) == 1  # not answered again with INTERNAL
    assert [o.code for o in outcomes] == [grpc.StatusCode.CANCELLED]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def observed(
    handler: grpc.RpcMethodHandler[object, object], outcomes: list[RpcOutcome]
) -> grpc.RpcMethodHandler[object, object] | None:
    """``handler`` of a command method as the gateway serves it, under the observability
    and last-resort interceptors, each call's outcome appended to ``outcomes``."""

    async def resolve(details: object) -> grpc.RpcMethodHandler[object, object]:
        return handler

    interceptors = Interceptors(
        [
            ObservabilityInterceptor([SimpleNamespace(rpc_finished=outcomes.append)]),
            LastResortInterceptor(),
        ]
    )
    call = SimpleNamespace(method="/orders.v1.OrderCommandService/X", invocation_metadata=())
    return await interceptors.intercept_service(resolve, call)


class SendFailsContext(GoneClientContext):
    """A context whose client went away while the call was answering: a response's send
    raises InternalError."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[object] = []

    async def write(self, response: object) -> None:
        self.written.append(response)
        raise grpc.aio.InternalError('Failed "execute_batch"')


async def test_a_stream_whose_send_fails_is_cancelled_and_its_error_goes_to_grpc() -> None:
    # Its responses are written by the interceptors' wrapper itself (served as a
    # client-streaming method): the send's own error reaches grpc, not the last-resort
    # handler, and the call ends as if the stream had been closed at that response.
    closed: list[str] = []

    async def answers(request: object, context: SendFailsContext) -> AsyncIterator[str]:
        try:
            yield "first"
            yield "second"
        finally:
            closed.append("closed")

    outcomes: list[RpcOutcome] = []
    handler = await observed(grpc.unary_stream_rpc_method_handler(answers), outcomes)
    assert handler is not None and handler.stream_stream is not None
    context = SendFailsContext()
    with pytest.raises(grpc.aio.InternalError):
        await handler.stream_stream(iter(()), context)  # type: ignore[arg-type,misc]
    assert context.written == ["first"]
    assert context.aborted == []  # not answered again with INTERNAL
    for _ in range(10):  # a stream dropped unfinished is closed by asyncio, soon after
        await asyncio.sleep(0)
    assert [o.code for o in outcomes] == [grpc.StatusCode.CANCELLED]
    assert closed == ["closed"]


async def test_health_probes_are_logged_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=ACCESS)
    async with running() as (_, clients):
        health = health_pb2_grpc.HealthStub(clients.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    (line,) = access_lines(caplog)
    assert line.levelno == logging.DEBUG
    assert fields(line)["method"] == "/grpc.health.v1.Health/Check"
    assert fields(line)["code"] == "OK"


async def test_json_lines_carry_every_field(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    async with running() as (_, clients):
        await clients.restock("sku-1", 5, metadata=(("x-request-id", "abc"),))
    (line,) = access_lines(caplog)
    entry = json.loads(JsonFormatter().format(line))
    assert entry["logger"] == ACCESS
    assert entry["level"] == "INFO"
    assert entry["method"] == "/orders.v1.InventoryCommandService/RestockProduct"
    assert entry["code"] == "OK"
    assert entry["request_id"] == "abc"
    assert {"duration_ms", "correlation_id", "user_id", "peer"} <= entry.keys()


def outcome(code: grpc.StatusCode = grpc.StatusCode.OK, request_id: str = "r") -> RpcOutcome:
    return RpcOutcome(
        method="/orders.v1.OrderCommandService/CreateOrder",
        rpc_type="server_stream",
        code=code,
        duration=0.002,
        request_id=request_id,
        correlation_id="",
        user_id="",
        peer="ipv4:127.0.0.1:5000",
        trace_id="",
    )


async def test_lines_are_written_after_a_short_delay_with_the_time_their_call_ended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    access_log = AccessLog(flush_delay=0.05)
    ended = time.time()
    access_log.rpc_finished(outcome(request_id="first"))
    access_log.rpc_finished(outcome(request_id="second"))
    assert access_lines(caplog) == []

    await asyncio.sleep(0.2)

    first, second = access_lines(caplog)
    assert (fields(first)["request_id"], fields(second)["request_id"]) == ("first", "second")
    # Stamped when rpc_finished ran, not when the batch was written 50 ms later.
    assert ended <= first.created < ended + 0.04
    assert first.msecs == int((first.created % 1) * 1000)


async def test_a_server_fault_is_written_at_once_after_the_lines_before_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    access_log = AccessLog(flush_delay=3600)
    access_log.rpc_finished(outcome(request_id="ok"))
    access_log.rpc_finished(outcome(grpc.StatusCode.INTERNAL, request_id="fault"))
    assert [fields(line)["request_id"] for line in access_lines(caplog)] == ["ok", "fault"]
    assert access_lines(caplog)[1].levelno == logging.WARNING


async def test_a_full_batch_is_written_without_waiting(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    access_log = AccessLog(flush_delay=3600, max_pending=3)
    for n in range(4):
        access_log.rpc_finished(outcome(request_id=str(n)))
    assert [fields(line)["request_id"] for line in access_lines(caplog)] == ["0", "1", "2"]
    access_log.flush()
    assert len(access_lines(caplog)) == 4


async def test_stopping_the_gateway_writes_pending_lines(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    monkeypatch.setattr(app, "AccessLog", lambda: AccessLog(flush_delay=3600))
    async with running() as (_, clients):
        await clients.restock("sku-1", 5)
        assert access_lines(caplog) == []
    (line,) = access_lines(caplog)
    assert fields(line)["method"] == "/orders.v1.InventoryCommandService/RestockProduct"


async def test_calls_a_stop_cuts_are_logged_by_the_stop_though_their_handlers_carry_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    store = FrozenStore()
    async with running(store, secured=True, shutdown_grace=0.2) as (gateway, clients):
        calls = [
            asyncio.ensure_future(clients.restock("sku-1", 1, metadata=AUTH)) for _ in range(3)
        ]
        await until(lambda: len(store.appending) == 3)
        await gateway.stop()
        errors = [await rpc_error(call) for call in calls]
        # Their handlers still run; the stop has written their lines all the same.
        lines = access_lines(caplog)
        assert [error.code() for error in errors] == [grpc.StatusCode.UNAVAILABLE] * 3
        assert [fields(line)["code"] for line in lines] == ["CANCELLED"] * 3
        # What the calls' own ends would have said: the caller, and the command ids the
        # server chose (the requests named none).
        assert {fields(line)["user_id"] for line in lines} == {USER}
        assert {fields(line)["correlation_id"] for line in lines} == {
            commit.command_id for commit in store.appending
        }
        # Their handlers end at last: no second line.
        store.thawed.set()
        await until(lambda: store.ended == 3)
        await asyncio.sleep(0.05)
        gateway.access_log.flush()
        assert len(access_lines(caplog)) == 3


@pytest.fixture
def gateway_logging(
    keep_root_logger: None, monkeypatch: pytest.MonkeyPatch
) -> Callable[[str, int | None], io.StringIO]:
    """Logging configured as ``order-gateway serve`` does, to the stream returned."""
    for switch in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, switch, getattr(logging, switch))

    def configure(log_format: str, worker: int | None) -> io.StringIO:
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        configure_logging(log_format, "debug", worker)
        return stream

    return configure


def log_a_few(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same lines each time, with the same times: a quarter of a second apart."""
    times = iter([1764425341.8349 + n * 0.25 for n in range(5)])
    monkeypatch.setattr(access_log, "time", SimpleNamespace(time=lambda: next(times)))
    log = AccessLog(flush_delay=3600)
    log.rpc_finished(outcome())
    log.rpc_finished(
        dataclasses.replace(
            outcome(grpc.StatusCode.ALREADY_EXISTS),
            correlation_id="checkout-7",
            user_id='é "q"',
            duration=1.23456,
        )
    )
    log.rpc_finished(
        dataclasses.replace(
            outcome(),
            method="/grpc.health.v1.Health/Check",
            trace_id="0af7651916cd43dd8448eb211c80319c",
        )
    )
    log.rpc_finished(outcome(grpc.StatusCode.INTERNAL))
    log.rpc_finished(outcome(request_id="last"))
    log.flush()


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("worker", [None, 3])
async def test_lines_written_straight_to_the_gateway_handler_are_those_logging_writes(
    gateway_logging: Callable[[str, int | None], io.StringIO],
    monkeypatch: pytest.MonkeyPatch,
    log_format: str,
    worker: int | None,
) -> None:
    stream = gateway_logging(log_format, worker)
    with monkeypatch.context() as no_records:
        no_records.setattr(access_log.log, "makeRecord", None)
        log_a_few(monkeypatch)
    direct = stream.getvalue()
    stream.truncate(0)
    stream.seek(0)

    # Any filter sends the lines through logging.
    access_log.log.addFilter(lambda record: True)
    try:
        log_a_few(monkeypatch)
    finally:
        access_log.log.filters.clear()
    assert direct == stream.getvalue()

    lines = direct.splitlines()
    assert len(lines) == 5
    first = lines[0] if log_format == "text" else json.loads(lines[0])["message"]
    assert str(first).endswith(
        "/orders.v1.OrderCommandService/CreateOrder OK 2.0 ms request_id=r"
        " correlation_id=- user=- peer=ipv4:127.0.0.1:5000"
    )
    traced = lines[2] if log_format == "text" else json.loads(lines[2])["message"]
    assert str(traced).endswith(
        " peer=ipv4:127.0.0.1:5000 trace_id=0af7651916cd43dd8448eb211c80319c"
    )


@pytest.mark.parametrize(
    "change",
    [
        lambda: logging.getLogger().addHandler(logging.NullHandler()),
        lambda: logging.getLogger(ACCESS).addHandler(logging.NullHandler()),
        lambda: logging.getLogger(ACCESS).addFilter(lambda record: True),
        lambda: logging.getLogger().handlers[0].addFilter(lambda record: True),
        lambda: logging.getLogger().handlers[0].setFormatter(logging.Formatter()),
        lambda: logging.setLogRecordFactory(lambda *args, **kwargs: logging.LogRecord(*args)),
    ],
    ids=[
        "another handler",
        "a handler of its own",
        "a logger filter",
        "a handler filter",
        "another formatter",
        "a record factory",
    ],
)
def test_lines_go_through_logging_once_anything_else_could_see_them(
    gateway_logging: Callable[[str, int | None], io.StringIO],
    change: Callable[[], None],
) -> None:
    gateway_logging("text", None)
    assert sole_gateway_handler(access_log.log) is not None
    factory = logging.getLogRecordFactory()
    access = logging.getLogger(ACCESS)
    try:
        change()
        assert sole_gateway_handler(access_log.log) is None
    finally:
        logging.setLogRecordFactory(factory)
        access.handlers.clear()
        access.filters.clear()


async def test_the_gateway_handlers_level_holds_for_lines_written_straight_to_it(
    gateway_logging: Callable[[str, int | None], io.StringIO],
) -> None:
    stream = gateway_logging("text", None)
    logging.getLogger().handlers[0].setLevel(logging.WARNING)
    access = AccessLog(flush_delay=3600)
    access.rpc_finished(outcome(request_id="info"))
    access.rpc_finished(outcome(grpc.StatusCode.INTERNAL, request_id="warning"))
    (line,) = stream.getvalue().splitlines()
    assert " WARNING " in line and "request_id=warning" in line


class BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("no space left")


async def test_lines_that_cannot_be_written_are_reported_as_logging_reports_them(
    gateway_logging: Callable[[str, int | None], io.StringIO],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway_logging("json", None)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(BrokenStream())
    reported: list[str] = []
    monkeypatch.setattr(handler, "handleError", lambda record: reported.append(record.msg))
    access = AccessLog(flush_delay=3600)
    access.rpc_finished(outcome(request_id="first"))
    access.rpc_finished(outcome(request_id="second"))
    access.flush()
    assert reported == [access_log.MESSAGE, access_log.MESSAGE]
