"""Message buses: how a publish reaches every node (process) of a deployment.

A gateway turns ``publish(topic, data)``, ``send_to_user(user_tag, data)`` and
``broadcast(data)`` into an `Envelope` and hands it to its bus; the bus calls the ``deliver``
callback of every node, the publishing one included, and that callback does the C fan-out.

- `LocalBus`: one process; publish calls deliver at once, in the caller's thread. The default.
- `ProcessBus`: the SO_REUSEPORT worker processes of one machine, relayed by their parent.
- `RedisBus`: several machines through a redis-server (sharded pub/sub where available),
  each envelope on the channel of its partition (`channel_for`, `route`; docs/scaling.md).

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
    read_holding,
)
from ._bus_process import ProcessBus
from ._bus_redis import RedisBus
from ._history import History, MemoryStore, ReadResult, stored_entry
from ._routing import PARTITIONS, channel_for, route, topic_partition, user_partition
from .errors import BusUnavailable

__all__ = [
    "PARTITIONS",
    "QUERY_KINDS",
    "BusBase",
    "channel_for",
    "route",
    "topic_partition",
    "user_partition",
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
    read_settles = True  # a read waits for the publish in progress (history_read)

    def __init__(self) -> None:
        super().__init__()
        self._closed = threading.Event()
        self._store: MemoryStore | None = None
        self._order = threading.Lock()  # with history: a stream's offsets are delivered in order

    def enable_history(self, history: History) -> None:
        """enable_history keeps the streams' history in this process's memory."""
        self._store = MemoryStore(history)

    def history_read(
        self,
        stream: str,
        after: int,
        max_count: int,
        max_bytes: int,
        lock: threading.Lock | None = None,
    ) -> ReadResult:
        """history_read reads the in-memory history (see BusBase.history_read).

        It reads between two publishes (under the lock publish stores and delivers under),
        so every message the result holds has been delivered here: a message stored but not
        delivered yet would otherwise be in the result, given to a resuming client as its
        position, and then come live with an offset that client takes for one it has (the
        first message of a stream, before any delivery of it was recorded, was lost so).
        """
        store = self._store
        if store is None:
            raise NotImplementedError("LocalBus: history is not enabled")
        with self._order:  # publish takes it, then the stripe: the same order here
            result: ReadResult = read_holding(
                lock, lambda: store.read(stream, after, max_count, max_bytes)
            )
        return result

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
            if self._store is not None and envelope.stream is not None:
                with self._order:  # store, then deliver, one message at a time
                    position = self._store.append(envelope.stream, stored_entry(envelope))
                    count = deliver(envelope.with_position(*position))
            else:
                count = deliver(envelope)
        except Exception:
            self.stats.add("deliver_errors")
            raise
        self.stats.add("delivered")
        return count or 0

    def close(self) -> None:
        """close makes later publishes raise BusUnavailable."""
        self._closed.set()
