"""An asyncio event loop for one request, which sleeps in ``wasi:io/poll``.

A WASI 0.2 component has no threads, sockets or selectors: everything it
waits for (an outbound response, body bytes, a timer) is a ``pollable``
from the host. This loop runs asyncio's own futures and tasks and, when
nothing is ready to run, hands the pollables the tasks wait on to
``poll`` in one call. It supports what a handler needs: tasks,
``asyncio.gather``, ``asyncio.sleep``, timeouts (``asyncio.wait_for``,
``asyncio.timeout``) and :meth:`PollLoop.wait`; sockets, subprocesses,
signals and threads do not exist here (``AbstractEventLoop`` raises
``NotImplementedError`` for them).

The loop is written against three functions rather than the bindings, so
it is tested outside WebAssembly with fake pollables.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Pollable(Protocol):
    """A ``wasi:io/poll`` pollable: a resource, dropped by ``__exit__``."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...


class PollLoop(asyncio.AbstractEventLoop):
    """Runs one request's coroutine to completion.

    ``poll(pollables)`` blocks until at least one is ready and returns the
    indexes of those that are; ``timer(seconds)`` is a pollable ready after
    that long; ``clock()`` is monotonic seconds. ``on_error`` receives the
    asyncio exception contexts (a task's exception nobody retrieved, a
    failing callback).
    """

    def __init__(
        self,
        poll: Callable[[list[Any]], list[int]],
        timer: Callable[[float], Pollable],
        clock: Callable[[], float],
        on_error: Callable[[dict[str, Any]], None],
    ) -> None:
        self._poll = poll
        self._timer = timer
        self._clock = clock
        self._on_error = on_error
        self._ready: collections.deque[asyncio.Handle] = collections.deque()
        self._timers: list[asyncio.TimerHandle] = []
        # (pollable, future) for each task waiting in `wait`.
        self._waiting: list[tuple[Any, asyncio.Future[None]]] = []
        self._running = False
        self._closed = False

    # What the loop adds: waiting for a pollable.

    async def wait(self, pollable: Pollable) -> None:
        """Waits until ``pollable`` is ready, letting other tasks run; drops
        it afterwards (also when the waiting task is cancelled)."""
        with pollable:
            entry = (pollable, self.create_future())
            self._waiting.append(entry)
            try:
                await entry[1]
            finally:
                self._waiting.remove(entry)

    # Running.

    def run_until_complete(self, future: Awaitable[T]) -> T:
        if self._closed:
            raise RuntimeError("the event loop is closed")
        if self._running:
            raise RuntimeError("the event loop is already running")
        task = asyncio.ensure_future(future, loop=self)
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        self._running = True
        try:
            while not task.done():
                self._run_once(task)
            self._cancel_leftovers(task)
        finally:
            self._running = False
            asyncio.events._set_running_loop(previous)
        return task.result()

    def _run_once(self, main: asyncio.Future[Any]) -> None:
        # Callbacks scheduled while these run wait for the next round, after
        # a (non-blocking) look at the pollables, so a task that keeps
        # yielding cannot starve the others.
        for _ in range(len(self._ready)):
            handle = self._ready.popleft()
            if not handle._cancelled:
                handle._run()
        if main.done():
            return
        self._release_due_timers()

        waiting = [(p, f) for p, f in self._waiting if not f.done()]
        if self._ready:
            delay: float | None = 0.0
        elif self._timers:
            delay = max(0.0, self._timers[0].when() - self._clock())
        elif waiting:
            delay = None
        else:
            raise RuntimeError(
                "the handler waits for something that can never happen: inside a Berth "
                "module an async handler can await berth.http's *_async calls, "
                "asyncio.sleep and its own tasks, but no other event loop's futures"
            )
        pollables = [p for p, _ in waiting]
        timer = self._timer(delay) if delay is not None else None
        try:
            ready = self._poll(pollables + [timer] if timer is not None else pollables)
        finally:
            if timer is not None:
                timer.__exit__(None, None, None)
        for index in ready:
            if index < len(waiting):
                future = waiting[index][1]
                if not future.done():
                    future.set_result(None)
        self._release_due_timers()

    def _release_due_timers(self) -> None:
        now = self._clock()
        while self._timers and (self._timers[0].cancelled() or self._timers[0].when() <= now):
            handle = heapq.heappop(self._timers)
            if not handle.cancelled():
                self._ready.append(handle)

    def _cancel_leftovers(self, main: asyncio.Future[Any]) -> None:
        # Tasks the handler started and did not await: cancel them and let
        # them unwind (dropping what they wait on) before the request ends.
        leftovers = [t for t in asyncio.all_tasks(self) if t is not main and not t.done()]
        for task in leftovers:
            task.cancel()
        while self._ready and not all(t.done() for t in leftovers):
            for _ in range(len(self._ready)):
                handle = self._ready.popleft()
                if not handle._cancelled:
                    handle._run()

    # What asyncio's futures and tasks call.

    def call_soon(
        self, callback: Callable[..., Any], *args: Any, context: Any = None
    ) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_later(
        self, delay: float, callback: Callable[..., Any], *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        return self.call_at(self.time() + delay, callback, *args, context=context)

    def call_at(
        self, when: float, callback: Callable[..., Any], *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, callback, args, self, context)
        heapq.heappush(self._timers, handle)
        return handle

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        # Cancelled timers are skipped when they come due.
        pass

    def time(self) -> float:
        return self._clock()

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(self, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        return asyncio.Task(coro, loop=self, **kwargs)

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self._on_error(context)

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self._on_error(context)

    def get_debug(self) -> bool:
        return False

    def set_debug(self, enabled: bool) -> None:
        pass

    def is_running(self) -> bool:
        return self._running

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._running:
            raise RuntimeError("cannot close a running event loop")
        self._closed = True
        self._ready.clear()
        self._timers.clear()

    def stop(self) -> None:
        raise NotImplementedError("a request's loop runs until its handler returns")

    async def shutdown_asyncgens(self) -> None:
        pass

    async def shutdown_default_executor(self, timeout: float | None = None) -> None:
        pass
