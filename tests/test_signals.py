"""Stop signals (SIGTERM, SIGINT) ask a gateway to stop: the handler must survive a second
stop signal arriving while the first one's callback runs."""

from __future__ import annotations

import os
import signal
import threading

from lowmemws._signals import stop_signals_call


def test_a_stop_signal_during_the_stop_callback_does_not_deadlock() -> None:
    """The callback holds a (non-reentrant) lock, as Event.set does, when a second SIGTERM
    arrives: the nested handler must not call it again, which would wait for that lock for
    ever (a worker hung so when its supervisor died and a SIGTERM came with it)."""
    lock = threading.Lock()
    calls: list[bool] = []

    def stop() -> None:
        got = lock.acquire(timeout=2)  # a nested call would find the lock held
        calls.append(got)
        if not got:
            return
        try:
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # the second signal, right now
                for _ in range(1000):  # bytecodes: the interpreter runs the handler here
                    pass
        finally:
            lock.release()

    with stop_signals_call(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
    assert calls == [True]  # called once; the nested signal found the stop under way


def test_stop_signals_keep_calling_after_a_stop_has_run() -> None:
    """Each later stop signal calls the callback again (a repeated SIGINT is not lost)."""
    calls: list[int] = []
    with stop_signals_call(lambda: calls.append(1)):
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
    assert calls == [1, 1, 1]
