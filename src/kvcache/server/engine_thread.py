"""The thread that owns the engine.  HTTP handlers never touch ``LLM``: they put commands on a queue
(add a request, abort one, run a function) and receive each request's deltas on an asyncio queue.

Between steps the thread takes every pending command, so a new request joins the next batch (continuous
batching across clients).  A step that raises is rolled back by the engine; if the error belongs to one
request (its sampling or stop check raised), that request alone fails and the others go on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine.llm import LLM
from ..engine.sequence import RequestDelta, RequestMetrics, SamplingParams

log = logging.getLogger("kvcache.server")
_FAILED_STEPS_BEFORE_GIVING_UP = 3  # a forward pass failing with no request to blame, this many times in a row
# After a step the engine waits (at most this long) for the event loop to write the step's chunks: on a
# machine with few cores, HTTP work running during the next forward pass would stall its OpenMP threads.
_FLUSH_WAIT = 0.05


class Overloaded(Exception):
    """The engine's queue is full: the request is refused now (429) instead of queueing without bound."""

    def __init__(self, waiting: int, retry_after: int = 1):
        super().__init__(waiting, retry_after)  # the args rebuild it when pickled (a Ray replica raises it)
        self.waiting, self.retry_after = waiting, retry_after

    def __str__(self) -> str:
        return f"the server is overloaded: {self.waiting} requests are already waiting; retry later"


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    tag: Any  # the caller's label for this request's deltas (e.g. its prompt's index)


class EngineThread:
    def __init__(self, llm: LLM, on_step: Callable[[list[RequestDelta], float], None] | None = None,
                 on_change: Callable[[], None] | None = None, max_waiting: int | None = None):
        self.llm = llm
        self.max_waiting = max_waiting  # requests waiting for a batch slot beyond which new ones are refused
        self.on_step = on_step  # metrics: called on the engine thread after each step, with its deltas
        self.on_change = on_change  # ... then once the step's finished requests are collected, and after commands
        # that changed the engine without a step (aborts)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, _Stream] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvcache-engine", daemon=True)
        self.failed_steps = 0

    # --- called from the event loop ------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def add(self, prompt: str | list[int], params: SamplingParams, cache_salt: str | None,
                  out: asyncio.Queue, tag: Any = None) -> int:
        """Queue a request; its deltas arrive on ``out`` as ``(tag, delta)``.  Raises what ``add_request`` raises,
        or ValueError if the request can never fit in KV memory."""
        stream = _Stream(asyncio.get_running_loop(), out, tag)
        return await self.call(lambda llm: self._add(llm, prompt, params, cache_salt, stream))

    def abort(self, request_id: int) -> None:
        """Drop a request (its client went away); its blocks are freed before the next step."""
        self._commands.put(("abort", request_id))

    async def call(self, fn: Callable[[LLM], Any]) -> Any:
        """Run ``fn(llm)`` on the engine thread between steps; its result or its exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(("call", (fn, lambda result, error: _resolve_soon(loop, future, result, error))))
        return await future

    def call_blocking(self, fn: Callable[[LLM], Any]) -> Any:
        """``call`` from a plain thread (benchmarks, tests): nothing else steps the engine while ``fn`` runs."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", (fn, lambda result, error: future.set_exception(error) if error is not None
                                     else future.set_result(result))))
        return future.result()

    # --- the engine thread ---------------------------------------------------
    def _add(self, llm: LLM, prompt, params, cache_salt, stream: _Stream) -> int:
        if self.max_waiting is not None:
            _, waiting = llm.request_counts()
            if waiting >= self.max_waiting:
                raise Overloaded(waiting)
        request_id = llm.add_request(prompt, params, cache_salt)
        error = llm.requests[request_id].error
        if error is not None:  # too big for the whole pool: refuse now rather than stream an error
            llm.abort_request(request_id)
            raise ValueError(error)
        self._streams[request_id] = stream
        return request_id

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._take_commands(block=not self.llm.has_unfinished())
            if self.llm.has_unfinished():
                self._step()
        for request_id in list(self._streams):  # shutting down: nobody is left waiting
            self._fail(request_id, "the server is shutting down")

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._run_command(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
        if self.on_change is not None:  # an abort on an idle engine: no step follows to refresh the gauges
            self.on_change()

    def _run_command(self, kind: str, arg: Any) -> None:
        if kind == "abort":
            self._streams.pop(arg, None)
            if arg in self.llm.requests:
                self.llm.abort_request(arg)
        elif kind == "call":
            fn, reply = arg
            try:
                result, error = fn(self.llm), None
            except BaseException as exc:  # handed to the caller, whatever it is
                result, error = None, exc
            reply(result, error)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            deltas = self.llm.step_deltas()
        except Exception as exc:
            self._step_failed(exc)
            return
        self.failed_steps = 0
        if self.on_step is not None:
            self.on_step(deltas, time.perf_counter() - start)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if delta.finished:
                self._streams.pop(delta.request_id, None)
                self.llm.output(delta.request_id)  # collected: the engine forgets it
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, delta))
        if self.on_change is not None:  # after the finished requests are collected: their blocks are free
            self.on_change()
        flushed = []
        for loop, items in by_loop.items():  # one wake-up of the event loop per step, not one per request
            done = threading.Event()
            if _deliver_soon(loop, items, done):
                flushed.append(done)
        for done in flushed:  # the streams write their chunks now, not during the next forward pass
            done.wait(_FLUSH_WAIT)

    def _step_failed(self, exc: Exception) -> None:
        """The engine rolled the step back.  Blame one request if the error names it; otherwise retry, and
        after repeated failures fail everything held (the engine cannot make progress)."""
        culprit = getattr(exc, "request_id", None)
        log.error("engine step failed (request %s): %r", culprit, exc)
        if culprit is not None and culprit in self.llm.requests:
            self.llm.abort_request(culprit)
            self._fail(culprit, f"the request failed inside the engine: {exc!r}")
            return
        self.failed_steps += 1
        if self.failed_steps >= _FAILED_STEPS_BEFORE_GIVING_UP:
            for request_id in list(self.llm.requests):
                self.llm.abort_request(request_id)
                self._fail(request_id, f"the engine failed {self.failed_steps} steps in a row: {exc!r}")
            self.failed_steps = 0

    def _fail(self, request_id: int, message: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            _send(stream, RequestDelta(request_id, [], True, RequestMetrics(time.perf_counter()), message))


def _send(stream: _Stream, delta: RequestDelta) -> None:
    _deliver_soon(stream.loop, [(stream, delta)])


def _deliver_soon(loop: asyncio.AbstractEventLoop, items: list[tuple[_Stream, RequestDelta]],
                  done: threading.Event | None = None) -> bool:
    try:
        loop.call_soon_threadsafe(_deliver, loop, items, done)
        return True
    except RuntimeError:  # the event loop is closed (the server is stopping): nobody to tell
        return False


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[_Stream, RequestDelta]],
             done: threading.Event | None) -> None:
    for stream, delta in items:
        stream.out.put_nowait((stream.tag, delta))
    if done is not None:  # runs after the stream tasks these puts woke (they were scheduled first)
        loop.call_soon(done.set)


def _resolve_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any, error) -> None:
    try:
        loop.call_soon_threadsafe(_resolve, future, result, error)
    except RuntimeError:  # the event loop is closed
        pass


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
