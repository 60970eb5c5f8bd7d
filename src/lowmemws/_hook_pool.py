"""HookPool: a bounded pool of threads for on_message, with back-pressure, not drops.

These are threads of one process (Config.hook_threads); "worker" in lowmemws means a
process (Gateway(processes=N)).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("lowmemws")

Job = tuple[Callable[..., None], tuple[Any, ...]]


class HookPool:
    """HookPool runs jobs on ``threads`` threads from a queue of at most ``size`` jobs.

    submit never blocks and never drops: it returns False when the queue is full, and the
    caller (the loop) keeps the job and stops reading that socket until room returns.
    ``on_room`` is called from a hook thread when the queue falls to half after being
    full, so the loop can resume reading.
    """

    def __init__(self, threads: int, size: int, on_room: Callable[[], None]) -> None:
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=size)
        self._size = size
        self._on_room = on_room
        self._was_full = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"lowmemws-hook-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., None], *args: Any) -> bool:
        """submit queues fn(*args); False when the queue is full (nothing queued)."""
        try:
            self._queue.put_nowait((fn, args))
            return True
        except queue.Full:
            self._was_full.set()
            return False

    @property
    def depth(self) -> int:
        """depth is the number of jobs waiting."""
        return self._queue.qsize()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fn, args = job
            try:
                fn(*args)
            except Exception:
                log.exception("lowmemws: on_message raised")
            if self._was_full.is_set() and self._queue.qsize() <= self._size // 2:
                self._was_full.clear()
                self._on_room()

    def stop(self, timeout: float = 5.0) -> None:
        """stop lets queued jobs finish, then ends the threads (waiting at most timeout)."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout)
