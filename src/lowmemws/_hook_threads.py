"""HookThreads: the threads that run plain hooks when Config.hook_threads > 0.

Two queues, one pool: work of open connections (on_open, on_message, on_close) is taken
before handshakes (on_connect, on_http). After a deploy thousands of clients reconnect at
once and their on_connect calls may each block for milliseconds; the messages of the
clients already connected must not wait behind all of them.

These are threads of one process; "worker" in lowmemws means a process
(Gateway(processes=N)).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

Work = tuple[Callable[..., Any], tuple[Any, ...], "Future[Any] | None"]


class HookThreads:
    """HookThreads runs submitted calls on ``count`` threads (started on first use)."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._urgent: deque[Work] = deque()
        self._later: deque[Work] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], urgent: bool) -> None:
        """submit runs fn(*args) on a hook thread; urgent work goes before the rest. fn
        must handle its own exceptions (the Dispatcher's drains do)."""
        self._put((fn, args, None), urgent)

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], urgent: bool) -> Future[Any]:
        """call is submit with a Future for fn's result or exception (for asyncio code:
        asyncio.wrap_future)."""
        future: Future[Any] = Future()
        self._put((fn, args, future), urgent)
        return future

    def _put(self, work: Work, urgent: bool) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("lowmemws: the hook threads are stopped")
            (self._urgent if urgent else self._later).append(work)
            if len(self._threads) < self._count:
                self._start_thread()
            self._cond.notify()

    def _start_thread(self) -> None:
        thread = threading.Thread(
            target=self._run, name=f"lowmemws-hook-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _take(self) -> Work | None:
        with self._cond:
            while not (self._urgent or self._later or self._closed):
                self._cond.wait()
            if self._closed:
                return None
            return (self._urgent or self._later).popleft()

    def _run(self) -> None:
        while True:
            work = self._take()
            if work is None:
                return
            self._do(*work)
            del work  # a waiting thread keeps no reference to its last call's objects

    @staticmethod
    def _do(fn: Callable[..., Any], args: tuple[Any, ...], future: Future[Any] | None) -> None:
        if future is None:
            fn(*args)
        elif future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the waiting coroutine
                future.set_exception(exc)

    def close(self) -> int:
        """close stops the threads once their current call returns (a call that blocks
        cannot be interrupted: the threads are daemons) and drops what waits; returns how
        many calls were dropped."""
        with self._cond:
            self._closed = True
            dropped = list(self._urgent) + list(self._later)
            self._urgent.clear()
            self._later.clear()
            self._cond.notify_all()
        for _, _, future in dropped:
            if future is not None:
                future.cancel()
        return len(dropped)
