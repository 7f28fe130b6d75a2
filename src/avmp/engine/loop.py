"""The engine's step loop in a background thread, for an asyncio server.

One daemon thread owns the `Engine`: it alone adds, aborts and steps. Callers on any
thread (usually an asyncio event loop) send it commands through a thread-safe queue,
applied between steps, and receive each request's updates on an `asyncio.Queue` of
their own, filled with ``loop.call_soon_threadsafe``. When no request is unfinished the
thread blocks on the command queue, so an idle server spends no CPU. Why a thread and
not a process: docs/design-serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from avmp.engine.engine import Engine, EngineTotals, RequestOptions, RequestUpdate, is_whole
from avmp.memory.spec import AllocatorStats, MemoryUsage

DEFAULT_MAX_WAITING = 256
# QueueFull's retry hint: without a finished request to learn the pace from, this long
RETRY_AFTER_UNKNOWN_S = 1.0
RETRY_AFTER_RANGE_S = (0.1, 60.0)
RECENT_FINISHES = 64  # the pace of finishing is measured over this many requests
# shutdown waits this long for the thread beyond its timeout (the aborts' last step)
SHUTDOWN_GRACE_S = 10.0


class QueueFull(Exception):
    """Too many requests waiting; the caller should retry later (HTTP 429/503).

    Attributes:
        retry_after_s: when a retry may find room, estimated from the recent pace of
            finishing requests.
    """

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineClosed(Exception):
    """The loop is shutting down or shut down: it takes no new request (HTTP 503)."""


class EngineDead(Exception):
    """The engine thread stopped on an error (the message says which)."""


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state between two steps, copied by the engine thread (so reading it
    from another thread is safe).

    Attributes:
        usage: the pools' capacity and use.
        allocator: the allocator's lifetime counters (migrations, compactions...).
        totals: the engine's lifetime counters.
        healthy: False once the engine thread stopped on an error (``error`` says which).
        accepting: whether new requests are taken (False while shutting down).
        finished_per_s: requests finished per second, recently (0: none yet).
    """

    num_running: int
    num_waiting: int
    usage: MemoryUsage
    allocator: AllocatorStats
    totals: EngineTotals
    healthy: bool = True
    error: str | None = None
    accepting: bool = True
    finished_per_s: float = 0.0


class _Stream:
    """One request's channel from the engine thread to the coroutine that consumes it:
    the queue receives the request id (or the error that refused it), then its updates,
    or `EngineDead`."""

    __slots__ = ("loop", "queue", "request_id")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.request_id: int | None = None


class EngineLoop:
    """Runs one Engine's step loop in a background thread so an asyncio server can add,
    stream and cancel requests between steps.

    Args:
        engine: the engine, owned by the loop from `start` on (nothing else may call it).
        max_waiting: requests waiting at most (queued in the engine or on their way to
            it); one more is refused with `QueueFull`.
    Raises:
        ValueError: ``max_waiting`` not a whole number >= 1.
    """

    def __init__(self, engine: Engine, max_waiting: int = DEFAULT_MAX_WAITING) -> None:
        # a whole number: NaN passes the comparison and then refuses no request
        if not is_whole(max_waiting) or max_waiting < 1:
            raise ValueError(f"max_waiting must be a whole number >= 1, got {max_waiting!r}")
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the four fields below
        self._closed = False
        self._error: str | None = None
        self._num_submitted = 0  # adds sent and not yet in a snapshot
        self._snapshot = self._take_snapshot(0.0)
        self._thread: threading.Thread | None = None
        # owned by the engine thread
        self._streams: dict[int, _Stream] = {}
        self._num_applied = 0
        self._finishes: deque[float] = deque(maxlen=RECENT_FINISHES)
        self._deadline: float | None = None  # set by shutdown: abort what runs after it
        self._aborted_all = False

    # -- the callers' side ---------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (once)."""
        if self._thread is not None:
            raise RuntimeError("the engine loop was already started")
        self._thread = threading.Thread(target=self._main, name="avmp-engine", daemon=True)
        self._thread.start()

    async def generate(
        self, prompt: str | list[int], options: RequestOptions
    ) -> AsyncGenerator[RequestUpdate, None]:
        """Add a request and yield its updates as the engine reads its tokens, the last
        one ``finished``. Stopping early (``aclose()``, a cancelled task: a client that
        went away) aborts the request; its memory is freed at the next step.

        Raises (on the first ``__anext__``, before any update):
            ValueError: a bad prompt; `RequestTooLarge` for one that can never fit.
            QueueFull: ``max_waiting`` requests are waiting.
            EngineClosed: the loop is shutting down.
            EngineDead: the engine thread stopped on an error (also raised mid-stream).
        """
        stream = _Stream(asyncio.get_running_loop())
        self._submit(stream, prompt, options)
        finished = False
        try:
            reply = await stream.queue.get()
            if isinstance(reply, BaseException):
                finished = True  # refused: nothing to abort
                raise reply
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._commands.put(("cancel", stream))

    def _submit(self, stream: _Stream, prompt: str | list[int], options: RequestOptions) -> None:
        """Send an add command, or refuse it at once: dead, closed or full."""
        with self._lock:
            if self._error is not None:
                raise EngineDead(self._error)
            if self._thread is None:
                raise RuntimeError("start() the engine loop before generating")
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            waiting = self._snapshot.num_waiting + self._num_submitted
            if waiting >= self.max_waiting:
                raise QueueFull(
                    f"{waiting} requests are waiting (at most {self.max_waiting})",
                    self._retry_after_s(waiting - self.max_waiting + 1),
                )
            self._num_submitted += 1
            self._commands.put(("add", stream, prompt, options))

    def _retry_after_s(self, num_requests: int) -> float:
        """How long until ``num_requests`` more requests have finished, at the recent pace."""
        rate = self._snapshot.finished_per_s
        if rate <= 0:
            return RETRY_AFTER_UNKNOWN_S
        low, high = RETRY_AFTER_RANGE_S
        return min(high, max(low, num_requests / rate))

    def abort(self, request_id: int) -> None:
        """Abort a request at the next step (its stream ends with reason ``abort``);
        unknown or finished ids are ignored."""
        self._commands.put(("abort", request_id))

    def snapshot(self) -> EngineSnapshot:
        """The engine's state after the latest step (a copy: safe from any thread)."""
        return self._snapshot

    def shutdown(self, abort_running: bool, timeout_s: float = 30.0) -> None:
        """Stop taking requests (`EngineClosed`); let the running and waiting ones
        finish for at most ``timeout_s`` and abort the rest (``abort_running=False``),
        or abort them all now; stop the thread; close the engine (its device memory is
        released). Blocks until then: from a coroutine, call it through
        ``asyncio.to_thread`` so that the streams receive their last updates."""
        with self._lock:
            self._closed = True
        thread = self._thread
        if thread is None:
            self.engine.close()
            return
        deadline = time.monotonic() + (0.0 if abort_running else timeout_s)
        self._commands.put(("shutdown", deadline))
        thread.join(timeout_s + SHUTDOWN_GRACE_S)

    # -- the engine thread ---------------------------------------------------------

    def _main(self) -> None:
        """Apply commands, step while requests are unfinished, publish a snapshot after
        each step; block on the command queue when idle. Ends after a shutdown once
        every request finished, or on an error (`EngineDead` to every stream)."""
        try:
            while not self._is_done():
                idle = not self.engine.has_unfinished_requests and self._deadline is None
                self._apply_commands(block=idle)
                self._maybe_abort_all()
                if self.engine.has_unfinished_requests:
                    self._deliver(self.engine.step())
                self._publish()
        except Exception as error:  # the engine is unusable: tell every stream
            self._die(f"{type(error).__name__}: {error}")
        finally:
            self._close_engine()

    def _is_done(self) -> bool:
        return self._deadline is not None and not self.engine.has_unfinished_requests

    def _apply_commands(self, block: bool) -> None:
        """Apply every queued command; with ``block``, wait for the first."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
            while True:
                self._apply(command)
                command = self._commands.get_nowait()
        except queue.Empty:
            return

    def _apply(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "add":
            self._add(*command[1:])
        elif kind == "cancel":
            request_id = command[1].request_id
            if request_id is not None:
                self.engine.abort_request(request_id)
        elif kind == "abort":
            self.engine.abort_request(command[1])
        elif kind == "shutdown":
            self._deadline = command[1]

    def _add(self, stream: _Stream, prompt: str | list[int], options: RequestOptions) -> None:
        """Add a request; a refusal goes to its stream, not to the loop."""
        self._num_applied += 1
        try:
            request_id = self.engine.add_request(prompt, options)
        except Exception as error:
            self._send(stream.loop, [(stream, error)])
            return
        stream.request_id = request_id
        self._streams[request_id] = stream
        self._send(stream.loop, [(stream, request_id)])

    def _maybe_abort_all(self) -> None:
        """After a shutdown's deadline, abort every request still unfinished."""
        if self._aborted_all or self._deadline is None or time.monotonic() < self._deadline:
            return
        for request_id in self._streams:
            self.engine.abort_request(request_id)
        self._aborted_all = True

    def _deliver(self, updates: list[RequestUpdate]) -> None:
        """Hand a step's updates to their streams: one call per event loop."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Any]]] = {}
        now = time.monotonic()
        for update in updates:
            stream = self._streams.get(update.request_id)
            if update.finished:
                self._streams.pop(update.request_id, None)
                self._finishes.append(now)
            if stream is not None:
                batches.setdefault(stream.loop, []).append((stream, update))
        for loop, items in batches.items():
            self._send(loop, items)

    @staticmethod
    def _send(loop: asyncio.AbstractEventLoop, items: list[tuple[_Stream, Any]]) -> None:
        with contextlib.suppress(RuntimeError):  # that event loop closed: nobody listens
            loop.call_soon_threadsafe(_put_all, items)

    def _publish(self) -> None:
        snapshot = self._take_snapshot(self._finished_per_s())
        with self._lock:
            self._snapshot = snapshot
            self._num_submitted -= self._num_applied  # now counted as waiting (or done)
            self._num_applied = 0

    def _take_snapshot(self, finished_per_s: float) -> EngineSnapshot:
        engine = self.engine
        return EngineSnapshot(
            engine.num_running,
            engine.num_waiting,
            engine.allocator.usage(),
            copy.deepcopy(engine.allocator.stats),
            dataclasses.replace(engine.totals),
            accepting=not self._closed,
            finished_per_s=finished_per_s,
        )

    def _finished_per_s(self) -> float:
        finishes = self._finishes
        if len(finishes) < 2 or finishes[-1] <= finishes[0]:
            return 0.0
        return (len(finishes) - 1) / (finishes[-1] - finishes[0])

    def _die(self, error: str) -> None:
        """Record the error, refuse new requests, and end every open stream and every
        request still on its way with `EngineDead`."""
        with self._lock:
            self._error = error
            self._closed = True
            self._snapshot = dataclasses.replace(
                self._snapshot, healthy=False, error=error, accepting=False
            )
            pending = list(self._streams.values())
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if command[0] == "add":
                    pending.append(command[1])
        for stream in pending:
            self._send(stream.loop, [(stream, EngineDead(error))])
        self._streams.clear()

    def _close_engine(self) -> None:
        try:
            self.engine.close()
        except Exception as error:  # already failing: keep the first error
            if self._error is None:
                self._die(f"closing the engine: {type(error).__name__}: {error}")


def _put_all(items: list[tuple[_Stream, Any]]) -> None:
    """Runs on the consumers' event loop."""
    for stream, item in items:
        stream.queue.put_nowait(item)
