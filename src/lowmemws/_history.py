"""History: the stored messages of each stream, their positions, and the in-memory store.

Theory of operation (issue 12). A topic's messages form the stream "t:" + topic, a user's
"u:" + its decimal user tag. With `History` on, a message is stored first and fanned out
after, stamped with its position: the stream's ``epoch`` (a random id, new whenever the
stream's history is lost) and its ``offset`` (1, 2, ... within the stream). A client that
reconnects names the last position it saw per stream; the gateway reads what follows
from the store (`HistoryStore.read`) and replays it (see _resume).

Where the history lives depends on the bus: `MemoryStore` (this module) for LocalBus and
ProcessBus, where it is owned by the one process every publish passes through (the
ProcessBus parent), and Redis Streams for RedisBus (_history_redis). Memory grows per
message and per stream, bounded by `History.memory_bytes` and `History.max_streams`,
never per connection.

A stored entry is one byte of RFC 6455 opcode followed by the payload (`stored_entry`).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Protocol

from ._bus_base import Envelope

__all__ = ["History", "HistoryStore", "MemoryStore", "ReadResult", "new_epoch", "stored_entry"]

_MiB = 1024 * 1024
_EPOCH_BYTES = 8  # 16 hex characters: a lost history is never mistaken for the new one


def new_epoch() -> str:
    """new_epoch is a fresh random stream epoch (16 hex characters)."""
    return secrets.token_hex(_EPOCH_BYTES)


def stored_entry(envelope: Envelope) -> bytes:
    """stored_entry is what the store keeps of a message: its opcode byte, then the payload."""
    return bytes((envelope.opcode,)) + envelope.payload


@dataclass(frozen=True)
class History:
    """History turns on stored streams, positions and resume (off while Config.history is None).

    Per kind of stream (topic, user): how many messages are kept (``*_size``) and for how
    long (``*_ttl``, seconds). ``memory_bytes`` and ``max_streams`` bound the in-memory store
    of LocalBus and ProcessBus (the oldest messages, then the least recently used streams, go
    first: a stream that goes loses its epoch). A resume replays at most
    ``replay_max_messages`` and ``replay_max_bytes`` per stream and connection, else the client
    is told to refresh; ``replay_threads`` connections are replayed at once per process
    (the replay budget: others wait in a queue of at most ``replay_queue`` connections, past
    which they are told to refresh too).

    Raises:
        ValueError: a size, count or time that is not positive.
    """

    topic_size: int = 100
    """Messages kept per topic stream."""
    topic_ttl: float = 600.0
    """Seconds a topic message is kept."""
    user_size: int = 100
    """Messages kept per user stream."""
    user_ttl: float = 600.0
    """Seconds a user message is kept."""
    memory_bytes: int = 64 * _MiB
    """All stored payloads of the in-memory store together (LocalBus, ProcessBus)."""
    max_streams: int = 100_000
    """Streams the in-memory store keeps (with or without messages)."""
    replay_max_messages: int = 100
    """Messages one resume replays per stream; more: the client is told to refresh."""
    replay_max_bytes: int = 256 * 1024
    """Payload bytes one resume replays per stream; more: the client is told to refresh."""
    replay_threads: int = 4
    """Connections replayed at once per process (the replay budget)."""
    replay_queue: int = 100_000
    """Connections waiting for their replay per process; past it: told to refresh."""

    def __post_init__(self) -> None:
        for name in (
            "topic_size", "user_size", "memory_bytes", "max_streams", "replay_max_messages",
            "replay_max_bytes", "replay_threads", "replay_queue",
        ):  # fmt: skip
            value = getattr(self, name)
            if not (isinstance(value, int) and 0 < value < 1 << 62):
                raise ValueError(f"History.{name} must be a positive int")
        for name in ("topic_ttl", "user_ttl"):
            if not 0 < getattr(self, name) < 1e9:
                raise ValueError(f"History.{name} must be a positive number of seconds")

    def size_for(self, stream: str) -> int:
        """size_for is the number of messages kept for stream."""
        return self.topic_size if stream.startswith("t:") else self.user_size

    def ttl_for(self, stream: str) -> float:
        """ttl_for is how long stream's messages are kept (seconds)."""
        return self.topic_ttl if stream.startswith("t:") else self.user_ttl


@dataclass
class ReadResult:
    """ReadResult is a stream's history after a position.

    ``epoch``: the stream's epoch ("" when the store has no such stream); ``last``: the
    offset of its newest message (0 for none); ``first``: the offset of its oldest message
    still kept (``last + 1`` when none is); ``entries``: (offset, stored entry) pairs in
    order, from the requested position on; ``truncated``: more followed past the bounds.
    """

    epoch: str
    last: int
    first: int
    entries: list[tuple[int, bytes]] = field(default_factory=list)
    truncated: bool = False


class HistoryStore(Protocol):
    """HistoryStore keeps streams: ``append`` stores a message and gives its position,
    ``read`` returns what follows a position. Both are thread-safe."""

    def append(self, stream: str, entry: bytes) -> tuple[str, int]:
        """append stores entry at the end of stream and returns its (epoch, offset)."""

    def read(self, stream: str, after: int, max_count: int, max_bytes: int) -> ReadResult:
        """read returns the entries of stream after offset ``after``, within the bounds."""


class _Stream:
    """One stream of the in-memory store: its position and its kept messages."""

    __slots__ = ("epoch", "offset", "entries", "size")

    def __init__(self) -> None:
        self.epoch = new_epoch()
        self.offset = 0
        self.entries: deque[tuple[int, float, bytes]] = deque()  # offset, stored at, entry
        self.size = 0


class MemoryStore:
    """MemoryStore is the history of one machine, in the memory of one process.

    It is bounded by ``history.memory_bytes`` (payloads) and ``history.max_streams``.
    """

    def __init__(self, history: History, clock: object = time.monotonic) -> None:
        self._history = history
        self._clock = clock if callable(clock) else time.monotonic
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def stored_bytes(self) -> int:
        """stored_bytes is the payload bytes kept, all streams together."""
        return self._bytes

    def append(self, stream: str, entry: bytes) -> tuple[str, int]:
        """append stores entry at the end of stream and returns its (epoch, offset)."""
        now = float(self._clock())
        with self._lock:
            state = self._streams.get(stream)
            if state is None:
                state = self._streams[stream] = _Stream()
                self._evict_streams()
            else:
                self._streams.move_to_end(stream)
            state.offset += 1
            state.entries.append((state.offset, now, entry))
            state.size += len(entry)
            self._bytes += len(entry)
            self._trim(stream, state, now)
            self._evict_bytes()
            return state.epoch, state.offset

    def read(self, stream: str, after: int, max_count: int, max_bytes: int) -> ReadResult:
        """read returns the entries of stream after offset ``after``, within the bounds."""
        now = float(self._clock())
        with self._lock:
            state = self._streams.get(stream)
            if state is None:
                return ReadResult("", 0, 1)
            self._trim(stream, state, now)
            first = state.entries[0][0] if state.entries else state.offset + 1
            result = ReadResult(state.epoch, state.offset, first)
            size = 0
            start = max(0, after + 1 - first)
            for index in range(start, len(state.entries)):
                offset, _, entry = state.entries[index]
                if len(result.entries) >= max_count or size + len(entry) > max_bytes:
                    result.truncated = True
                    break
                result.entries.append((offset, entry))
                size += len(entry)
            return result

    def _trim(self, stream: str, state: _Stream, now: float) -> None:
        """Drop what is past the stream's size or age."""
        keep, oldest = self._history.size_for(stream), now - self._history.ttl_for(stream)
        entries = state.entries
        while entries and (len(entries) > keep or entries[0][1] < oldest):
            self._drop_oldest(state)

    def _drop_oldest(self, state: _Stream) -> None:
        _, _, entry = state.entries.popleft()
        state.size -= len(entry)
        self._bytes -= len(entry)

    def _evict_bytes(self) -> None:
        """Past memory_bytes, the least recently appended streams lose their oldest
        messages first (their positions stay, so their clients are told to refresh)."""
        for state in self._streams.values():
            if self._bytes <= self._history.memory_bytes:
                return
            while state.entries and self._bytes > self._history.memory_bytes:
                self._drop_oldest(state)

    def _evict_streams(self) -> None:
        while len(self._streams) > self._history.max_streams:
            _, state = self._streams.popitem(last=False)
            self._bytes -= state.size
