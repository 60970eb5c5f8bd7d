"""Supervisor: forks the SO_REUSEPORT worker processes, restarts any that dies, stops them.

Each worker process runs its own loop and C server on the shared port; the kernel spreads
new connections over them. Their counters live in one shared mapping (one lmw_stats each)
so any process can sum them for /metrics. A worker's pid in its lmw_stats is 0 until it
serves, which is how the supervisor knows every worker is ready.

Between those events the supervisor sleeps: it waits in poll() on a pidfd per worker
(readable when that worker exits) and on a pipe written by stop requests (the stop signals'
handler, terminate()), so an idle supervisor does not wake at all.

A worker whose supervisor dies (SIGKILL, a crash) gets SIGTERM from the kernel and stops as
on any SIGTERM: its clients are closed with 1001 and reconnect to a live process, instead of
staying on an orphan that nobody restarts and whose ProcessBus is gone.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from . import metrics
from ._native import ffi
from ._signals import default_stop_signals, stop_signals_call
from .bus import Bus, ProcessBus

log = logging.getLogger("lowmemws")

_READY_TIMEOUT = 30.0
_REAP_INTERVAL = 0.2  # where pidfds are missing (Linux < 5.3): how often to look for exits
_KILL_GRACE = 2.0  # seconds past shutdown_timeout before a worker is killed
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal for when the parent dies

RunWorker = Callable[[int, Any], None]
"""RunWorker(index, stats) serves in a forked worker process until it is told to stop."""


class Supervisor:
    """Supervisor keeps ``count`` worker processes running ``run_worker``.

    run() returns on SIGTERM/SIGINT or once ``stopping`` is set, after every worker closed
    its clients (with 1001) and exited, or was killed shutdown_timeout + 2 s later.
    """

    def __init__(
        self, count: int, run_worker: RunWorker, bus: Bus, shutdown_timeout: float
    ) -> None:
        self._count = count
        self._run_worker = run_worker
        self._bus = bus
        self._shutdown_timeout = shutdown_timeout
        self._children: dict[int, int] = {}  # pid -> worker index
        self._pidfds: dict[int, int] = {}  # pid -> its pidfd (readable once it exits)
        self._stop_r, self._stop_w = os.pipe()  # a byte here: look at `stopping` again
        os.set_blocking(self._stop_w, False)
        size = metrics.STATS_SIZE
        self._stats_map = mmap.mmap(-1, size * count)  # shared with the forked workers
        base = ffi.from_buffer(self._stats_map)
        self.stats_views: list[Any] = [
            ffi.cast("lmw_stats *", base + i * size) for i in range(count)
        ]

    def run(self, stopping: threading.Event, ready: threading.Event) -> None:
        """run forks the workers, sets ready once all serve, and restarts any that dies."""
        for index in range(self._count):
            self._spawn(index)
        if isinstance(self._bus, ProcessBus):
            self._bus.attach_parent()

        def stop() -> None:
            stopping.set()
            self._nudge()

        with stop_signals_call(stop):
            try:
                self._wait_workers_ready()
                ready.set()
                while not stopping.is_set():
                    self._reap(restart=True)
                    self._wait_for_change(stopping)
            finally:
                self._stop_children()
                pipe = (self._stop_r, self._stop_w)
                self._stop_r = self._stop_w = -1  # a late terminate() writes nowhere
                for fd in pipe:
                    os.close(fd)

    def _nudge(self) -> None:
        """_nudge wakes run() (from a signal handler or another thread)."""
        if self._stop_w < 0:
            return
        try:
            os.write(self._stop_w, b"x")
        except OSError:  # full: it is awake anyway
            pass

    def _wait_for_change(self, stopping: threading.Event) -> None:
        """_wait_for_change sleeps until a worker exits or a stop is asked for."""
        if self._pidfds.keys() != self._children.keys():  # no pidfds here: look periodically
            stopping.wait(_REAP_INTERVAL)
            return
        poller = select.poll()
        poller.register(self._stop_r, select.POLLIN)
        for pidfd in self._pidfds.values():
            poller.register(pidfd, select.POLLIN)
        if any(fd == self._stop_r for fd, _ in poller.poll()):
            os.read(self._stop_r, 4096)

    def terminate(self) -> None:
        """terminate asks every worker to stop now (SIGTERM); safe from any thread."""
        for pid in list(self._children):
            _kill(pid, signal.SIGTERM)
        self._nudge()

    def _wait_workers_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            if sum(1 for view in self.stats_views if view.pid) >= self._count:
                return
            time.sleep(0.01)

    def _spawn(self, index: int) -> None:
        self.stats_views[index].pid = 0
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:
            self._be_worker(index, supervisor)
        self._children[pid] = index
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            try:
                self._pidfds[pid] = pidfd_open(pid)
            except OSError:  # an older kernel: _wait_for_change looks periodically instead
                pass

    def _be_worker(self, index: int, supervisor: int) -> None:
        """_be_worker runs in the forked child and never returns."""
        code = 0
        try:
            default_stop_signals()
            _stop_with_parent(supervisor)
            for fd in (*self._pidfds.values(), self._stop_r, self._stop_w):
                os.close(fd)  # the supervisor's own
            self._children, self._pidfds = {}, {}  # a worker supervises nobody
            if isinstance(self._bus, ProcessBus):
                self._bus.attach_worker(index)
            self._run_worker(index, self.stats_views[index])
        except BaseException:
            log.exception("lowmemws: worker %d failed", index)
            code = 1
        finally:
            os._exit(code)

    def _reap(self, restart: bool) -> None:
        while self._children:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self._children.pop(pid, None)
            pidfd = self._pidfds.pop(pid, None)
            if pidfd is not None:
                os.close(pidfd)
            if index is None:
                continue
            self.stats_views[index].pid = 0
            if restart:
                self._restart(index, pid)

    def _restart(self, index: int, pid: int) -> None:
        log.warning("lowmemws: worker %d (pid %d) died; restarting it", index, pid)
        if isinstance(self._bus, ProcessBus):
            self._bus.respawn_pair(index)
        self._spawn(index)
        if isinstance(self._bus, ProcessBus):
            self._bus.attach_parent()

    def _stop_children(self) -> None:
        self.terminate()
        deadline = time.monotonic() + self._shutdown_timeout + _KILL_GRACE
        while self._children and time.monotonic() < deadline:
            self._reap(restart=False)
            time.sleep(0.05)
        for pid in list(self._children):
            _kill(pid, signal.SIGKILL)
        while self._children:
            self._reap(restart=False)
            time.sleep(0.01)
        self._bus.close()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop_with_parent(supervisor: int) -> None:
    """_stop_with_parent (in a forked worker) has the kernel send it SIGTERM when the
    supervisor dies. The stop signals' default action (until the worker installs its own
    handler) ends a worker that had not served yet; a serving one stops gracefully."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the worker outlives a killed supervisor
        return
    if os.getppid() != supervisor:  # it died between the fork and the prctl
        os.kill(os.getpid(), signal.SIGTERM)
