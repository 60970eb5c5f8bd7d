"""Message buses: how a publish reaches every node (process) of a deployment.

A gateway turns ``publish(topic, data)``, ``send_to_user(user_tag, data)`` and
``broadcast(data)`` into an `Envelope` and hands it to its bus; the bus calls the ``deliver``
callback of every node, the publishing one included, and that callback does the C fan-out.

- `LocalBus`: one process; publish calls deliver at once, in the caller's thread. The default.
- `ProcessBus`: the SO_REUSEPORT worker processes of one machine, relayed by their parent.
- `RedisBus`: several machines through a redis-server (sharded pub/sub where available).

Every bus raises `lowmemws.errors.BusUnavailable` from ``publish`` when it cannot take an
envelope; an envelope it took is delivered or counted in `BusStats` (never lost silently).
"""

from __future__ import annotations

import threading

from ._bus_base import (
    OPCODE_BINARY,
    OPCODE_TEXT,
    QUERY_KINDS,
    Bus,
    BusBase,
    BusStats,
    Deliver,
    Envelope,
    Kind,
    Policy,
)
from ._bus_process import ProcessBus
from ._bus_redis import RedisBus
from .errors import BusUnavailable

__all__ = [
    "QUERY_KINDS",
    "BusBase",
    "OPCODE_BINARY",
    "OPCODE_TEXT",
    "Bus",
    "BusStats",
    "BusUnavailable",
    "Deliver",
    "Envelope",
    "Kind",
    "LocalBus",
    "Policy",
    "ProcessBus",
    "RedisBus",
]


class LocalBus(BusBase):
    """LocalBus is the in-process bus: publish calls this node's deliver synchronously.

    An exception from deliver reaches the publisher (it is also counted in
    ``deliver_errors``). publish before start or after close raises BusUnavailable.
    """

    may_block = False  # publish fans out here and returns: nothing to wait for

    def __init__(self) -> None:
        super().__init__()
        self._closed = threading.Event()

    def start(self, deliver: Deliver) -> None:
        """start sets the callback that every publish calls."""
        self._deliver = deliver

    def publish(self, envelope: Envelope) -> int:
        """publish delivers ``envelope`` to this node before it returns, and returns the
        count deliver gave (the connections that took it).

        Raises:
            BusUnavailable: the bus is not started, or is closed.
            Exception: whatever deliver raised (counted in ``deliver_errors``).
        """
        deliver = self._deliver
        if deliver is None or self._closed.is_set():
            self.stats.add("refused")
            raise BusUnavailable("LocalBus is not started or is closed")
        self.stats.add("published")
        try:
            count = deliver(envelope)
        except Exception:
            self.stats.add("deliver_errors")
            raise
        self.stats.add("delivered")
        return count or 0

    def close(self) -> None:
        """close makes later publishes raise BusUnavailable."""
        self._closed.set()
