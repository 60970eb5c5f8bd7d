"""Dispatcher: hook calls off the loop thread, one connection at a time, in order, bounded.

A job is one hook call for one connection (its key: fd and generation). Coroutine jobs run
as tasks on the AsyncioHost; plain jobs on the hook threads (Config.hook_threads). While a
job of a key runs, later jobs of that key wait in a queue behind it and are run by the
same "drain" when it finishes, so one connection's hooks never overlap and keep their
order (on_connect, on_open, each message, on_close), whatever mix of coroutine and plain
hooks. When the drain finds the queue empty the key is forgotten: a connection with no
hook running holds no task, future or entry here.

A job of an open connection (on_open, on_message, on_close) is taken by the hook threads
before any handshake job (on_connect, on_http): a reconnect storm of blocking on_connect
calls does not delay the messages of the clients already connected.

Jobs running or queued are counted, and the loop submits only while the count is under
Config.hook_queue (else it holds the job and stops reading and accepting: see _loop). A key
whose queue grows past KEY_QUEUE_MAX has its socket paused until the queue halves, so one
busy connection cannot fill the bound for everyone.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any, NamedTuple

from ._aio import AsyncioHost
from ._hook_threads import HookThreads
from .handshake import wrong_type

log = logging.getLogger("lowmemws")

Key = tuple[int, int]

#: Jobs that may wait behind a running one of the same connection before it is paused.
KEY_QUEUE_MAX = 16

# Why a connection's reading is paused; it is read again only when no reason is left.
_PAUSED_QUEUE = 1  # its queue here passed KEY_QUEUE_MAX
_PAUSED_HELD = 2  # the loop holds a message of it (the dispatcher was at its bound)


class Job(NamedTuple):
    """Job is one hook call: fn(*args), awaited when is_coroutine."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    is_coroutine: bool
    name: str  # the hook's name, for the log when it raises

    @property
    def urgent(self) -> bool:
        """urgent: work of an open connection, taken by the hook threads before handshakes."""
        return self.name not in HANDSHAKE_HOOKS


HANDSHAKE_HOOKS = ("connect", "http")


def check_result(name: str, result: object) -> None:
    """check_result logs a plain hook that returned an awaitable (an ``async`` function
    wrapped in a plain one, or a lambda): it was never awaited, so its work never ran."""
    if result is not None and inspect.isawaitable(result):
        log.error("lowmemws: %s", wrong_type(f"on_{name}", result, "None"))


def _cancelling() -> bool:
    """_cancelling: the current task is being cancelled (not merely a hook that let a
    CancelledError of its own out). Python 3.10 cannot tell: it counts as cancelled."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or bool(cancelling())


class Dispatcher:
    """Dispatcher runs jobs per connection (see the module doc). submit is for the loop
    thread; the rest may run on any thread.

    ``on_room`` is called (from whichever thread finishes a job) when the count falls to
    half the limit after reaching it; ``on_count`` (lock held, any thread) with the jobs in
    flight after every change: the count plus those the loop holds (set_held), so the gauge
    is right without a turn of the loop, which sleeps until an event; ``pause``/``resume``
    stop and restart reading a key's socket.
    """

    def __init__(
        self,
        threads: int,
        limit: int,
        aio: AsyncioHost,
        on_room: Callable[[], None],
        pause: Callable[[int, int], None],
        resume: Callable[[int, int], None],
        run_inline: Callable[[Callable[..., Any], tuple[Any, ...]], Future[Any]],
        on_count: Callable[[int], None] | None = None,
    ) -> None:
        self._threads = HookThreads(threads) if threads else None
        self._limit = max(1, limit)
        self._aio = aio
        self._on_room = on_room
        self._pause = pause
        self._resume = resume
        self._run_inline = run_inline
        self._lock = threading.Lock()
        self._busy: dict[Key, deque[Job]] = {}
        self._paused: dict[Key, int] = {}  # key -> _PAUSED_* bits
        self._count = 0
        self._held = 0  # jobs the loop holds back (set_held): in flight for on_count too
        self._on_count = on_count
        self._full = False
        self._closed = False

    # -- loop thread ------------------------------------------------------------------------

    def busy(self, key: Key) -> bool:
        """busy: a job of key runs or waits (only the loop thread adds keys: an unlocked
        "no" from the loop thread stays true until it submits)."""
        return key in self._busy

    @property
    def has_room(self) -> bool:
        """has_room: fewer jobs than the limit run or wait."""
        return self._count < self._limit

    @property
    def count(self) -> int:
        """count is the number of jobs running or waiting."""
        return self._count

    def submit(self, key: Key, job: Job) -> None:
        """submit runs job now, or queues it behind the running job of its key."""
        with self._lock:
            self._count += 1
            self._counted()
            if self._count >= self._limit:
                self._full = True
            queue = self._busy.get(key)
            if queue is not None:
                queue.append(job)
                if len(queue) >= KEY_QUEUE_MAX:
                    self._pause_for(key, _PAUSED_QUEUE, True)
            else:
                self._busy[key] = deque()
        if queue is None:
            self._start(key, job)

    def set_held(self, held: int) -> None:
        """set_held tells how many jobs the loop holds back while the bound is reached."""
        with self._lock:
            if held != self._held:
                self._held = held
                self._counted()

    def _counted(self) -> None:
        """_counted reports the jobs in flight (lock held)."""
        if self._on_count is not None:
            self._on_count(self._count + self._held)

    def _pause_for(self, key: Key, reason: int, on: bool) -> None:
        """_pause_for sets or clears one reason to pause key's reading (lock held: the C
        calls are made in the order the reasons change)."""
        before = self._paused.get(key, 0)
        after = before | reason if on else before & ~reason
        if after:
            self._paused[key] = after
        else:
            self._paused.pop(key, None)
        if before and not after:
            self._resume(*key)
        elif after and not before:
            self._pause(*key)

    def hold_reading(self, key: Key) -> None:
        """hold_reading pauses key's reading while the loop holds a message of it."""
        with self._lock:
            self._pause_for(key, _PAUSED_HELD, True)

    def release_reading(self, keys: set[Key]) -> None:
        """release_reading ends hold_reading for keys (each is read again unless its queue
        here is still too long)."""
        with self._lock:
            for key in keys:
                self._pause_for(key, _PAUSED_HELD, False)

    def _start(self, key: Key, job: Job) -> None:
        if job.is_coroutine:
            self._aio.spawn(functools.partial(self._drain_async, key, job))
        elif self._threads is not None:
            self._threads.submit(self._drain_in_thread, (key, job), job.urgent)
        else:  # a plain hook, no hook threads: it runs here, as inline hooks do
            self._drain_in_thread(key, job, inline=True)

    # -- any thread -------------------------------------------------------------------------

    def _finish(self, key: Key) -> Job | None:
        """_finish ends the running job of key and returns the next one, or None (the key is
        forgotten)."""
        room = False
        with self._lock:
            self._count -= 1
            self._counted()
            queue = self._busy[key]
            following = queue.popleft() if queue else None
            if following is None:
                del self._busy[key]
            if len(queue) <= KEY_QUEUE_MAX // 2 and self._paused.get(key, 0) & _PAUSED_QUEUE:
                self._pause_for(key, _PAUSED_QUEUE, False)
            if self._full and self._count <= self._limit // 2:
                self._full = False
                room = True
        if room:
            self._on_room()
        return following

    def _abandon(self, key: Key) -> None:
        """_abandon forgets key and its queued jobs: its drain was cancelled (shutdown, or a
        handshake hook past its deadline: nothing can queue behind a handshake)."""
        with self._lock:
            queue = self._busy.pop(key, None)
            if queue is not None:
                self._count -= 1 + len(queue)
                self._counted()
            self._paused.pop(key, None)  # shutdown: no need to read it again

    def _drain_in_thread(self, key: Key, job: Job | None, inline: bool = False) -> None:
        while job is not None:
            if inline and job.is_coroutine:  # the loop thread never waits for a coroutine
                self._aio.spawn(functools.partial(self._drain_async, key, job))
                return
            try:
                if job.is_coroutine:
                    self._aio.run(job.fn(*job.args))
                else:
                    check_result(job.name, job.fn(*job.args))
            except CancelledError:  # the coroutine was cancelled: shutdown
                self._abandon(key)
                return
            except Exception:
                log.exception("lowmemws: on_%s raised", job.name)
            job = self._finish(key)

    async def _drain_async(self, key: Key, job: Job | None) -> None:
        try:
            while job is not None:
                try:
                    if job.is_coroutine:
                        await job.fn(*job.args)
                    elif self._threads is not None:
                        result = await asyncio.wrap_future(
                            self._threads.call(job.fn, job.args, job.urgent)
                        )
                        check_result(job.name, result)
                    else:  # a plain hook with no hook threads: on the gateway's loop thread
                        result = await asyncio.wrap_future(self._run_inline(job.fn, job.args))
                        check_result(job.name, result)
                except asyncio.CancelledError:
                    if _cancelling():
                        raise
                    log.exception("lowmemws: on_%s raised", job.name)  # it let one out
                except Exception:
                    log.exception("lowmemws: on_%s raised", job.name)
                job = self._finish(key)
        except asyncio.CancelledError:  # shutdown, or a handshake hook past its deadline
            self._abandon(key)
            raise

    # -- shutdown ---------------------------------------------------------------------------

    def close(self) -> int:
        """close cancels what still runs (coroutines; a running thread cannot be stopped,
        its result is discarded) and returns how many jobs were abandoned."""
        if self._closed:
            return 0
        self._closed = True
        left = self._count
        self._aio.cancel_all()
        if self._threads is not None:
            self._threads.close()
        return left
