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
from concurrent.futures import CancelledError, Future
from typing import Any, TypeVar

log = logging.getLogger("lowmemws")

T = TypeVar("T")
CoroutineFactory = Callable[[], Coroutine[Any, Any, None]]

#: How long close() lets cancelled hook tasks run their except/finally blocks.
_CANCEL_WAIT = 1.0


class AsyncioHost:
    """AsyncioHost runs hook coroutines as tasks on one asyncio loop (see the module doc).

    spawn, kick, run, cancel_all and close may be called from any thread; watch, unwatch
    and call_soon only from a task or callback on the loop.
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
        self._waiting: set[Future[Any]] = set()  # results other threads wait for (run)
        self._closed = False  # the gateway's own loop is stopped (or never to start): close

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

        The coroutine runs as a hook task, so cancel_all cancels it like the others; one
        the loop never started (it stopped first) is given up by close(): the waiting
        thread always wakes.

        Raises:
            Exception: whatever the coroutine raised.
            concurrent.futures.CancelledError: it was cancelled or given up (shutdown).
        """
        done: Future[T] = Future()

        async def relay() -> None:
            try:
                result = await coroutine
            except asyncio.CancelledError:
                done.cancel()
                raise
            except BaseException as exc:  # handed to the waiting thread, not left on the task
                if not done.done():
                    done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise  # SystemExit, KeyboardInterrupt: the loop's to handle
            else:
                if not done.done():
                    done.set_result(result)

        self._waiting.add(done)  # before the check: close() cancels it, or we see _closed
        try:
            if not self._closed:
                try:
                    self.spawn(relay)
                    self.kick()
                except RuntimeError:  # the loop closed meanwhile
                    if not self._closed:
                        raise
                else:
                    return done.result()
            coroutine.close()  # a hook thread that outlived the shutdown: no loop runs it now
            raise CancelledError()
        finally:
            self._waiting.discard(done)

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
        """_cancel_and_wait cancels the hook tasks still running and lets them unwind (their
        except and finally blocks run) for at most _CANCEL_WAIT seconds."""
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_CANCEL_WAIT)

    def close(self) -> None:
        """close stops the gateway's own loop (the caller's loop is the caller's to stop),
        once the tasks cancel_all cancelled have ended (at most _CANCEL_WAIT seconds): each
        hook gets its CancelledError (its except and finally blocks run) instead of being
        dropped pending with the loop. Coroutines that hook threads still hand over
        afterwards are given up (run raises CancelledError): no loop is started again."""
        if not self._own:
            return
        self._closed = True
        if self._loop is None or self._thread is None:
            return
        loop = self._loop
        if loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._cancel_and_wait(), loop).result(_CANCEL_WAIT + 1)
        except Exception:  # a hook that blocks the loop: stop it all the same
            log.warning("lowmemws: hook tasks did not end after their cancellation")
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            loop.close()
        for waiting in list(self._waiting):  # run() calls the stopped loop will never start
            waiting.cancel()
