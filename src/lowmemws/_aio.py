"""AsyncioHost: the asyncio event loop on which coroutine hooks run.

With ``Gateway.serve()`` it is the caller's running loop; with ``run()``/``start()`` it is
a loop of the gateway's own, in a thread started the first time a coroutine hook runs (a
gateway with only plain hooks never starts it). The gateway's loop thread hands coroutines
over in batches: one wake-up of the asyncio loop per batch, not one per hook.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger("lowmemws")

T = TypeVar("T")
CoroutineFactory = Callable[[], Coroutine[Any, Any, None]]


class AsyncioHost:
    """AsyncioHost runs hook coroutines as tasks on one asyncio loop (see the module doc).

    Every method may be called from any thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._own = loop is None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._pending: deque[CoroutineFactory] = deque()
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()  # strong references while they run
        self._deadlines: dict[asyncio.Task[Any], float] = {}  # see watch()
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """loop is the asyncio loop (the gateway's own one is started on first use)."""
        if self._loop is None:
            with self._start_lock:
                if self._loop is None:
                    self._loop = self._start_own()
        return self._loop

    def _start_own(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        eager = getattr(asyncio, "eager_task_factory", None)  # Python 3.12+
        if eager is not None:  # a hook that returns without waiting costs no loop turn
            loop.set_task_factory(eager)
        self._thread = threading.Thread(
            target=loop.run_forever, name="lowmemws-asyncio", daemon=True
        )
        self._thread.start()
        return loop

    def spawn(self, factory: CoroutineFactory) -> None:
        """spawn queues factory() to run as a task on the loop at the next kick()."""
        self._pending.append(factory)

    def kick(self) -> None:
        """kick hands the queued coroutines to the loop: one wake-up for all of them. The
        gateway's loop thread calls it once per turn, after its C calls, so that the asyncio
        thread starts while the loop thread waits in epoll instead of competing with it
        for the GIL."""
        if self._pending and not self._scheduled:
            self._scheduled = True  # cleared by _flush before it drains: nothing is stranded
            self.loop.call_soon_threadsafe(self._flush)

    def call_soon(self, callback: Callable[[], object]) -> None:
        """call_soon runs callback on the loop after the tasks ready now have stepped (it
        must be called on the loop's thread)."""
        self.loop.call_soon(callback)

    def _flush(self) -> None:
        self._scheduled = False
        loop = self.loop
        tasks = self._tasks
        while self._pending:
            task = loop.create_task(self._tracked(self._pending.popleft()))
            if not task.done():  # an eager task (3.12+) may have finished already
                tasks.add(task)

    async def _tracked(self, factory: CoroutineFactory) -> None:
        """_tracked runs one hook coroutine and forgets its task at the end (cheaper than a
        done callback, which costs one more turn of the asyncio loop per task)."""
        try:
            await factory()
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._tasks.discard(task)

    def watch(self, deadline: float) -> None:
        """watch cancels the calling task if it still runs at deadline (the loop's clock,
        checked about once a second). For the hook of a parked request: by then C has
        answered it 408, so the coroutine is only holding a place in Config.hook_queue."""
        task = asyncio.current_task()
        if task is None:
            return
        self._deadlines[task] = deadline
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(1.0, self._cancel_overdue)

    def unwatch(self) -> None:
        """unwatch forgets the calling task's deadline (its hook returned in time)."""
        task = asyncio.current_task()
        if task is not None:
            self._deadlines.pop(task, None)

    def _cancel_overdue(self) -> None:
        now = self.loop.time()
        overdue = [task for task, deadline in self._deadlines.items() if deadline <= now]
        for task in overdue:
            del self._deadlines[task]
            task.cancel()
        if overdue:
            log.warning(
                "lowmemws: %d hook coroutines cancelled: their requests were answered 408 "
                "at handshake_timeout",
                len(overdue),
            )
        self._sweeper = self.loop.call_later(1.0, self._cancel_overdue) if self._deadlines else None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """run runs coroutine on the loop and waits for its result (from another thread).

        Raises:
            Exception: whatever the coroutine raised.
        """
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result()

    def on_loop_thread(self) -> bool:
        """on_loop_thread: the caller runs on this host's asyncio loop right now."""
        if self._loop is None:
            return False
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    @property
    def running(self) -> int:
        """running is the number of hook tasks not finished yet."""
        return len(self._tasks)

    def cancel_all(self) -> None:
        """cancel_all cancels every hook task still running (shutdown, after its wait)."""
        if self._loop is None or self._loop.is_closed():
            return

        def cancel() -> None:
            for task in list(self._tasks):
                task.cancel()

        self._loop.call_soon_threadsafe(cancel)

    async def _cancel_and_wait(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)

    def close(self) -> None:
        """close stops the gateway's own loop once its hook tasks are cancelled and have
        unwound (briefly); the caller's loop is the caller's to stop."""
        if not self._own or self._loop is None or self._thread is None:
            return
        if self._tasks:
            try:
                asyncio.run_coroutine_threadsafe(self._cancel_and_wait(), self._loop).result(2.0)
            except Exception:  # a task that will not unwind: the loop is stopped anyway
                log.warning("lowmemws: hook tasks did not end at shutdown")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()
