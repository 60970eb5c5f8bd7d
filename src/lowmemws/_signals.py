"""SIGTERM and SIGINT as a request to stop gracefully (clients get close 1001)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_signals_call(callback: Callable[[], None]) -> Iterator[None]:
    """stop_signals_call runs callback on SIGTERM or SIGINT while the block runs, then puts
    the previous handlers back. Outside the main thread Python cannot set handlers, so
    there it does nothing (the embedding application owns signals then)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    running = False

    def handler(signum: int, frame: Any) -> None:
        # Python runs a handler between two bytecodes of the main thread, so a second stop
        # signal (a supervisor's death and a service manager's SIGTERM together, say) can
        # interrupt the first handler's callback while it holds a lock (Event.set does):
        # calling it again there would wait for that lock for ever. The stop is already
        # requested then, so the nested signal has nothing left to do.
        nonlocal running
        if running:
            return
        running = True
        try:
            callback()
        finally:
            running = False

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def default_stop_signals() -> None:
    """default_stop_signals restores the default action (a forked worker must not inherit
    its supervisor's handlers before it installs its own)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
