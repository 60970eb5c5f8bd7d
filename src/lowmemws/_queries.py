"""Queries: the presence queries a node asked and waits for (the protocol: _presence).

A query costs one small record here while it waits; an answer that arrives for a query
nobody waits for any more (it timed out) is ignored.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

__all__ = ["Queries", "Tally", "new_query_id"]


def new_query_id() -> int:
    """new_query_id is a random non-zero 64-bit id (0 means "no answer wanted")."""
    return secrets.randbits(64) or 1


@dataclass(frozen=True, slots=True)
class Tally:
    """Tally is what a query heard: the summed count, the nodes that answered and the nodes
    it reached (None when that is not known: the query never left this process)."""

    count: int
    answered: int
    expected: int | None

    @property
    def complete(self) -> bool:
        """complete: every node the query reached has answered."""
        return self.expected is not None and self.answered >= self.expected


class _Pending:
    __slots__ = ("count", "answered", "expected")

    def __init__(self) -> None:
        self.count = 0
        self.answered = 0
        self.expected: int | None = None


class Queries:
    """Queries holds the queries this node asked and still waits for; thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[int, _Pending] = {}

    @property
    def waiting(self) -> bool:
        """waiting: at least one query waits for answers."""
        return bool(self._pending)

    def open(self, query_id: int, expected: int | None = None) -> None:
        """open starts waiting for the answers to query_id (expected: when known already)."""
        with self._cond:
            pending = self._pending[query_id] = _Pending()
            pending.expected = expected

    def expect(self, query_id: int, nodes: int) -> None:
        """expect says how many nodes query_id reached (learned once it was sent)."""
        with self._cond:
            pending = self._pending.get(query_id)
            if pending is not None:
                pending.expected = nodes
                self._cond.notify_all()

    def answer(self, query_id: int, count: int) -> None:
        """answer counts one node's answer to query_id; one nobody waits for is ignored."""
        with self._cond:
            pending = self._pending.get(query_id)
            if pending is not None:
                pending.count += count
                pending.answered += 1
                self._cond.notify_all()

    def wait(self, query_id: int, timeout: float) -> Tally:
        """wait blocks until every node reached has answered query_id, or timeout seconds;
        it forgets the query and returns what it heard."""
        deadline = time.monotonic() + timeout
        with self._cond:
            pending = self._pending[query_id]
            try:
                while not _done(pending):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                return Tally(pending.count, pending.answered, pending.expected)
            finally:
                del self._pending[query_id]


def _done(pending: _Pending) -> bool:
    return pending.expected is not None and pending.answered >= pending.expected
