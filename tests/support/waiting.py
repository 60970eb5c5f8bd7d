"""Bounded polling: wait until a condition holds, or fail saying what never happened."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    condition: Callable[[], bool],
    what: str,
    timeout: float,
    *,
    interval: float = 0.01,
    error: type[Exception] = AssertionError,
) -> None:
    """wait_until polls condition() every interval seconds until it is true.

    After timeout seconds it raises error("timed out waiting for <what>").
    """
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise error(f"timed out waiting for {what}")
        time.sleep(interval)


Waiter = Callable[..., None]
"""Waiter is the type of what waiter returns: (condition, what, timeout=default) -> None."""


def waiter(default_timeout: float, *, interval: float = 0.01) -> Waiter:
    """waiter returns wait_until with a module's own default timeout and polling interval."""

    def wait(condition: Callable[[], bool], what: str, timeout: float = default_timeout) -> None:
        wait_until(condition, what, timeout, interval=interval)

    return wait
