"""A server under test, timed step by step inside each call (``python -m bench.latency``).

    python -m bench.latency_probe OUT.json MODULE [ARGS…]

Runs ``MODULE``'s ``main(ARGS…)`` (the gateway's ``server.cli serve …`` or the floor's
``bench.floor_server …``) in this process, with timestamps taken at the steps of every
CreateOrder, and writes their medians to ``OUT.json`` when the server exits. SIGUSR1
forgets what was timed so far (the warm-up's calls).

The steps are taken where both servers have them: the handler called, the store append
begun and returned, each response handed to grpc and the handler resumed after it was
sent, the call's end; the gateway also has its request read (the floor's is read by grpc
before its handler runs). Each step is split into the event loop's own time and the time
it waited in ``select`` for something else (a store thread, grpc's completion queue, the
client) to happen. Only one call may be in flight: the steps of concurrent calls would
interleave. Both servers run on asyncio's own event loop here, whose waits can be timed.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import selectors
import signal
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

SERVICERS: Final = {
    "server.cli": ("server.rpc.servicers", "OrderCommandServicer"),
    "bench.floor_server": ("bench.floor_server", "DurableFloorOrders"),
}
"""Each server module's CreateOrder servicer: (module, class)."""

STORES: Final = {
    "server.cli": ("server.stores.sqlite", "SQLiteEventStore"),
    "bench.floor_server": ("bench.durable_log", "DurableLog"),
}
"""Each server module's store: (module, class) with an ``append`` coroutine method."""


@dataclass
class Call:
    """The marks of one call, in order, and the spans the loop spent waiting in it."""

    marks: list[tuple[str, float]] = field(default_factory=list)
    waits: list[tuple[float, float]] = field(default_factory=list)


class Timeline:
    """The calls timed so far; the call in progress, if any."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.current: Call | None = None
        self.loop_thread = threading.get_ident()

    def mark(self, step: str) -> None:
        if self.current is None:
            self.current = Call()
        self.current.marks.append((step, time.perf_counter()))

    def end(self) -> None:
        self.mark("end")
        if self.current is not None:
            self.calls.append(self.current)
        self.current = None

    def waited(self, started: float, ended: float) -> None:
        if self.current is not None and threading.get_ident() == self.loop_thread:
            self.current.waits.append((started, ended))

    def forget(self) -> None:
        self.calls = []
        self.current = None


def summary(calls: list[Call]) -> dict[str, Any]:
    """Per step between consecutive marks: the median time (µs) and the median part of it
    the loop waited in ``select``, over the calls with the commonest sequence of marks."""
    if not calls:
        return {"calls": 0, "steps": []}
    shapes: dict[tuple[str, ...], list[Call]] = {}
    for call in calls:
        shapes.setdefault(tuple(step for step, _ in call.marks), []).append(call)
    shape, same = max(shapes.items(), key=lambda item: len(item[1]))
    steps = []
    for n in range(1, len(shape)):
        spans = [(c.marks[n - 1][1], c.marks[n][1]) for c in same]
        waits = [_overlap(c.waits, *span) for c, span in zip(same, spans, strict=True)]
        steps.append(
            {
                "from": shape[n - 1],
                "to": shape[n],
                "us": statistics.median((end - start) * 1e6 for start, end in spans),
                "waited_us": statistics.median(w * 1e6 for w in waits),
            }
        )
    total = statistics.median((c.marks[-1][1] - c.marks[0][1]) * 1e6 for c in same)
    return {"calls": len(same), "of": len(calls), "total_us": total, "steps": steps}


def _overlap(waits: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in waits)


def _timed_generator(
    timeline: Timeline, method: Callable[..., AsyncIterator[Any]], ends_call: bool
) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(method)
    async def timed(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        timeline.mark("handler")
        written = 0
        async for response in method(*args, **kwargs):
            written += 1
            timeline.mark(f"response {written} handed to grpc")
            yield response
            timeline.mark(f"response {written} sent")
        if ends_call:
            timeline.end()
        else:
            timeline.mark("handler returned")

    return timed


def _timed_coroutine(
    timeline: Timeline,
    function: Callable[..., Coroutine[Any, Any, Any]],
    before: str | None,
    after: str | None,
) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(function)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            timeline.mark(before)
        result = await function(*args, **kwargs)
        if after is not None:
            timeline.mark(after)
        return result

    return timed


def _timed_select(timeline: Timeline) -> None:
    select = selectors.EpollSelector.select

    def timed(
        self: selectors.EpollSelector, timeout: float | None = None
    ) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout == 0:
            return select(self, timeout)
        started = time.perf_counter()
        try:
            return select(self, timeout)
        finally:
            timeline.waited(started, time.perf_counter())

    selectors.EpollSelector.select = timed  # type: ignore[assignment]


def install(timeline: Timeline, module: str) -> None:
    """The timestamps taken in ``module``'s server (a key of ``SERVICERS``)."""
    gateway = module == "server.cli"
    servicer_module, servicer_name = SERVICERS[module]
    servicer = getattr(importlib.import_module(servicer_module), servicer_name)
    # The floor's call ends with its handler; the gateway's ends its scopes after it.
    servicer.CreateOrder = _timed_generator(timeline, servicer.CreateOrder, not gateway)
    store_module, store_name = STORES[module]
    store = getattr(importlib.import_module(store_module), store_name)
    store.append = _timed_coroutine(timeline, store.append, "append begun", "append returned")
    if gateway:
        # The gateway reads its request itself (with the function a method's handler
        # takes when it is first called, after this), and ends its call's scopes
        # (metrics, the access log) after the handler, looked up as a module global.
        from server.rpc import method_handlers, request_reading

        request_reading._handed_over = _timed_coroutine(
            timeline, request_reading._handed_over, "call", None
        )
        end_scopes = method_handlers._end

        async def end_then_mark(
            scopes: list[method_handlers.CallScope], error: BaseException | None
        ) -> None:
            await end_scopes(scopes, error)
            timeline.end()

        method_handlers._end = end_then_mark
    _timed_select(timeline)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in SERVICERS:
        sys.exit(f"usage: python -m bench.latency_probe OUT.json {{{','.join(SERVICERS)}}} ARGS…")
    out, module, args = Path(argv[0]), argv[1], argv[2:]
    # The waits are timed in asyncio's selector: uvloop waits inside libuv, out of reach.
    os.environ["ORDER_GATEWAY_EVENT_LOOP"] = "asyncio"
    timeline = Timeline()
    install(timeline, module)
    signal.signal(signal.SIGUSR1, lambda *_: timeline.forget())
    # The module's own ``main``, not the module run anew as ``__main__``: that would
    # define the floor's servicer again, without the timestamps.
    serve = importlib.import_module(module).main
    try:
        code = serve(args)
    finally:
        out.write_text(json.dumps(summary(timeline.calls)))
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
