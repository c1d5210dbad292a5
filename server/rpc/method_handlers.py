"""One way for an interceptor to act on calls: wrap each method's handler, once.

Every interceptor of the gateway runs the method's behaviour inside something of its own
(a check before it, a timer or an error handler around it). ``wrapped`` rebuilds a
handler of the same kind around its behaviour, and ``Interceptors`` builds each
method's wrapper once and reuses it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any, ClassVar, Final, Protocol, TypeAlias, cast

import grpc

from server.rpc.request_reading import WRITTEN, reading_its_request

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class CallScope:
    """What an interceptor runs around one call: ``start`` before the method's behaviour,
    ``end`` after its last response or with its error (as ``async with`` would)."""

    __slots__ = ()

    starts: ClassVar[bool] = False
    """Whether the class has a ``start`` of its own (set for each subclass): a call awaits
    only those. Awaiting the inherited one, which does nothing, cost some 1,000
    instructions per scope and call under callgrind."""

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls.starts = cls.start is not CallScope.start

    async def start(self) -> None:
        return None

    async def end(self, error: BaseException | None) -> bool:
        """Called with the error the behaviour raised, if any; True swallows it."""
        return False


class Refusing(CallScope):
    """Refuses the call with ``status`` before its behaviour runs."""

    __slots__ = ("_context", "_status")

    def __init__(self, context: Context, status: grpc.Status) -> None:
        self._context = context
        self._status = status

    async def start(self) -> None:
        await self._context.abort_with_status(self._status)


REFUSAL_LEAD_MOST: Final = 1.0
"""The most time before its deadline at which a held call is refused."""


def wait_before_refusal(context: Context) -> float | None:
    """How long the gateway may hold a call (while it starts, or begins to stop) before it
    refuses it UNAVAILABLE: until a quarter of the call's remaining time before its
    deadline, at most ``REFUSAL_LEAD_MOST``; None for a call without a deadline.

    The refusal says "not done, retry": it must reach the client before the client's own
    deadline ends the call DEADLINE_EXCEEDED (an outcome the client cannot know), and
    leave it time to retry elsewhere. A few milliseconds are not enough for that: a
    process on a loaded machine waits longer for a CPU (at a load average of 20 on 2
    cores, a hundred milliseconds and more), and so does one throttled by a container's
    CPU quota, or an answer crossing a network. A quarter keeps short deadlines held
    for most of their time.
    """
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return max(0.0, remaining - min(remaining / 4, REFUSAL_LEAD_MOST))


class Around(Protocol):
    def __call__(self, request: Any, context: Context) -> CallScope | None:
        """The scope of one call (``request`` is the request iterator of a
        client-streaming method), or None if the interceptor has nothing to do in it."""
        ...


Metadata: TypeAlias = "Sequence[tuple[str, str | bytes]]"
EarlyCheck: TypeAlias = Callable[[str, Metadata], "grpc.Status | None"]
"""Judges a call by its method and metadata as it arrives: a status refuses it."""


class WrappingInterceptor:
    """Acts on the calls to each method it ``applies_to`` by wrapping the method's handler
    (``wrapped``); served through ``Interceptors``."""

    refuses_missing_requests: ClassVar[bool] = False
    """Whether its wrapper refuses a call that ended without its request message, handed
    ``MISSING_REQUEST`` for one (``reading_its_request``)."""

    def applies_to(self, method: str, handler: Handler) -> bool:
        return True

    def wrap(self, handler: Handler, method: str) -> Handler:
        """``handler`` as this interceptor serves it."""
        raise NotImplementedError

    def wrap_refusal(self, refusing: Handler, method: str, handler: Handler) -> Handler:
        """``refusing``, which serves the calls to ``handler``'s method that an early check
        refused, as this interceptor serves it."""
        return self.wrap(refusing, method)

    def early_check(self) -> EarlyCheck | None:
        """A check of each call as it arrives, before grpc reads its request, if this
        interceptor has one. A wrapped behaviour runs only once the request message has
        come, so a call refused there holds its place among the server's concurrent calls
        for as long as the client withholds the message; a call this check refuses ends
        at once."""
        return None


_EARLY_REFUSAL: ContextVar[grpc.Status] = ContextVar("early_refusal")
"""The status an early check refused the current call with, for ``_refuse_early``."""


async def _refuse_early(requests: Any, context: Context) -> None:
    await context.abort_with_status(_EARLY_REFUSAL.get())


_REFUSING: Handler = grpc.stream_stream_rpc_method_handler(_refuse_early)
"""Serves a call an early check refused, whatever its method's kind: a stream-stream
handler reads no request before its behaviour runs."""


class Interceptors(grpc.aio.ServerInterceptor):
    """The grpc server interceptor that serves ``WrappingInterceptor``s, first outermost.

    Each method's handler is wrapped by all of them (the innermost first) on the
    method's first call and reused: the wrapper holds no per-call state (each call reads
    its own metadata), and building handlers on every call was a third of the
    interceptor stack's time. A different handler for the method (a servicer registered
    again) gets a new wrapper. Unknown methods (no handler) are left to grpc, which
    answers UNIMPLEMENTED. One grpc interceptor rather than one each: grpc runs its
    interceptors on every call, each a coroutine awaiting the next one's.
    """

    def __init__(self, interceptors: Sequence[WrappingInterceptor]) -> None:
        self._interceptors = tuple(reversed(interceptors))
        self._by_method: dict[str, tuple[Handler, Handler]] = {}
        # Each early check, with the interceptors outside the one it belongs to: they
        # serve its refusals (observability logs and counts them).
        self._early_checks = tuple(
            (check, tuple(reversed(interceptors[:position])))
            for position, interceptor in enumerate(interceptors)
            if (check := interceptor.early_check()) is not None
        )
        self._refusing: dict[tuple[str, int], Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        for position, (check, outside) in enumerate(self._early_checks):
            refusal = check(method, handler_call_details.invocation_metadata or ())
            if refusal is not None:
                # Read by the refusing behaviour: this runs in the call's own task.
                _EARLY_REFUSAL.set(refusal)
                return self._refusing_handler(handler, method, position, outside)
        cached = self._by_method.get(method)
        if cached is None or cached[0] is not handler:
            serving = handler
            missing_refused = False
            for interceptor in self._interceptors:
                if interceptor.applies_to(method, serving):
                    serving = interceptor.wrap(serving, method)
                    missing_refused = missing_refused or interceptor.refuses_missing_requests
            cached = (handler, reading_its_request(serving, missing_refused))
            self._by_method[method] = cached
        return cached[1]

    def _refusing_handler(
        self, handler: Handler, method: str, position: int, outside: Sequence[WrappingInterceptor]
    ) -> Handler:
        serving = self._refusing.get((method, position))
        if serving is None:
            serving = _REFUSING
            for interceptor in outside:
                if interceptor.applies_to(method, serving):
                    serving = interceptor.wrap_refusal(serving, method, handler)
            self._refusing[(method, position)] = serving
        return serving


def is_streaming_response(handler: Handler) -> bool:
    return handler.unary_stream is not None or handler.stream_stream is not None


def wrapped(
    handler: Handler,
    around: Around,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """``handler`` of the same kind, its behaviour run inside ``around(request, context)``.

    ``request_deserializer`` replaces the handler's own when given.
    """
    for kind, make_handler, wrap in _KINDS:
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            rebuilt: Handler = make_handler(
                wrap(behaviour, around),
                request_deserializer=request_deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            return rebuilt
    return handler


def checked_first(
    handler: Handler,
    check: Callable[[Any, Context], Awaitable[None]],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """``handler`` whose behaviour runs only after ``check(request, context)`` returned
    (a check refuses the call by aborting it)."""
    return wrapped(
        handler, lambda request, context: _Checked(check, request, context), request_deserializer
    )


class _Checked(CallScope):
    __slots__ = ("_check", "_context", "_request")

    def __init__(
        self, check: Callable[[Any, Context], Awaitable[None]], request: Any, context: Context
    ) -> None:
        self._check = check
        self._request = request
        self._context = context

    async def start(self) -> None:
        await self._check(self._request, self._context)


_SCOPES = "__call_scopes__"
"""The attribute of a wrapper built here: (the behaviour it runs, its arounds, outer first)."""


def _scoped(behaviour: Any, around: Around) -> tuple[Any, tuple[Around, ...]]:
    """The behaviour to run and the arounds to run it in, outer first: a wrapper built
    here is not wrapped again but rebuilt with one more around, so that however many
    interceptors wrap a method, each call runs one wrapper (one coroutine or async
    generator, not one per interceptor, each resumed for every response)."""
    inner, arounds = getattr(behaviour, _SCOPES, (behaviour, ()))
    return inner, (around, *arounds)


async def _end(scopes: list[CallScope], error: BaseException | None) -> None:
    """End the started ``scopes`` innermost first, as nested ``async with`` blocks would:
    each sees the error the one inside it left (None once one swallowed it)."""
    for scope in reversed(scopes):
        try:
            if await scope.end(error):
                error = None
        except BaseException as raised:
            if raised is not error and raised.__context__ is None:
                raised.__context__ = error
            error = raised
    if error is not None:
        raise error


def _streaming(behaviour: Any, around: Around) -> Any:
    # grpc calls a streaming behaviour differently by its kind (it checks the function):
    # an async generator yields responses, a coroutine (health's Watch) writes them
    # through its context. The wrapper must be of the same kind.
    inner, arounds = _scoped(behaviour, around)
    if inspect.iscoroutinefunction(inner):
        return _single(behaviour, around)
    # grpc's stubs type behaviours as synchronous; on an aio server they are async.
    stream = cast(Callable[[Any, Context], AsyncIterator[Any]], inner)

    async def call(request: Any, context: Context) -> AsyncIterator[Any]:
        scopes: list[CallScope] = []
        error: BaseException | None = None
        try:
            for make in arounds:
                scope = make(request, context)
                if scope is not None:
                    if scope.starts:
                        await scope.start()
                    scopes.append(scope)
            async for response in stream(request, context):
                yield response
        except BaseException as raised:
            error = raised
        await _end(scopes, error)

    async def written(request: Any, context: Context) -> None:
        # ``call`` as a coroutine that writes each response through the context, for a
        # method that reads its request first (``reading_its_request``): that coroutine
        # would otherwise iterate ``call``, an async generator of its own in each call
        # (counted by callgrind, some 8,000 instructions per call of two responses).
        # Its scopes start as ``call``'s do, written out again: a coroutine of their own
        # would be one more frame per call, the cost this wrapper saves.
        scopes: list[CallScope] = []
        error: BaseException | None = None
        failed_send: BaseException | None = None
        try:
            for make in arounds:
                scope = make(request, context)
                if scope is not None:
                    if scope.starts:
                        await scope.start()
                    scopes.append(scope)
            async for response in stream(request, context):
                try:
                    await context.write(response)
                except BaseException as raised:
                    failed_send = raised
                    break
        except BaseException as raised:
            error = raised
        if failed_send is not None:
            # As when the coroutine iterating ``call`` stops at a failed send: the scopes
            # end as ``call`` would when closed (GeneratorExit at its yield), and the send's
            # own error goes to grpc, past them.
            with contextlib.suppress(GeneratorExit):
                await _end(scopes, GeneratorExit())
            raise failed_send
        await _end(scopes, error)

    setattr(call, _SCOPES, (inner, arounds))
    setattr(call, WRITTEN, written)
    return call


def _single(behaviour: Any, around: Around) -> Any:
    inner, arounds = _scoped(behaviour, around)
    single = cast(Callable[[Any, Context], Awaitable[Any]], inner)

    async def call(request: Any, context: Context) -> Any:
        scopes: list[CallScope] = []
        error: BaseException | None = None
        result: Any = None
        try:
            for make in arounds:
                scope = make(request, context)
                if scope is not None:
                    if scope.starts:
                        await scope.start()
                    scopes.append(scope)
            result = await single(request, context)
        except BaseException as raised:
            error = raised
        await _end(scopes, error)
        return result

    setattr(call, _SCOPES, (inner, arounds))
    return call


_KINDS: tuple[tuple[str, Callable[..., Handler], Callable[[Any, Around], Any]], ...] = (
    ("unary_stream", grpc.unary_stream_rpc_method_handler, _streaming),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, _streaming),
    ("unary_unary", grpc.unary_unary_rpc_method_handler, _single),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, _single),
)
"""Each kind of handler: its behaviour's attribute, how grpc builds one, how to wrap it."""
