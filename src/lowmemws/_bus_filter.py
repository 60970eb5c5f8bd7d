"""BusFilter: RedisBus's subscriber side frames and judges pub/sub messages in C.

Theory of operation. A subscriber link reads as many bytes as its socket holds and hands
them to `BusFilter.scan`, which walks the complete RESP2/RESP3 frames in C
(lmw_bus_filter_scan in _bus_filter.c) and drops, without a Python object per message, the
node's own echoes, envelopes re-sent after a broken connection, and user envelopes for users
with no connection on this node's hub. What comes back, in wire order: messages to deliver
(judged already), messages the filter leaves to Python (the answer channel, messages too
short to carry the bus header), and whole other replies for hiredis. The filter counts what
it dropped or noticed (`BusFilter.take_counts`).

The sequence numbers (origin, number per channel) live in the filter, so one filter serves
every link of a bus (the subscriber thread alone uses it).

`BusFilter.wait` goes one step further for links on plain sockets (`LinkBuffer`): the whole
wait, read and judge loop runs in C with the GIL released (lmw_bus_wait in _bus_wait.c), and
Python wakes only for what it must see; a dropped message costs no Python at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._native import ffi, lib

__all__ = ["DELIVER", "REPLY", "UNJUDGED", "BusFilter", "BusProtocolError", "LinkBuffer", "Waited"]

#: DELIVER: a message judged in C (origin, sequence, user): decode and deliver it.
DELIVER: int = lib.LMW_BUS_DELIVER
#: UNJUDGED: a message the filter leaves to Python (answer channel, short message).
UNJUDGED: int = lib.LMW_BUS_UNJUDGED
#: REPLY: any other reply, a whole RESP frame (feed it to hiredis).
REPLY: int = lib.LMW_BUS_REPLY
_DROP: int = lib.LMW_BUS_DROP
_ITEMS = 1024  # items per scan call: a bounded array, reused
_LINK_BYTES = 256 * 1024  # a link's read buffer in C: many messages per recv
# while messages are dropped, the C loop hands their counts to Python this often: the bus's
# stats (bus_unserved_total) are at most this late; an idle link never wakes for it
_REPORT_EVERY = 0.25

#: What BusFilter.wait returns as its status (lmw.h describes each).
WAIT_ITEMS: int = lib.LMW_BUS_WAIT_ITEMS
WAIT_WOKEN: int = lib.LMW_BUS_WAIT_WOKEN
WAIT_TIMEOUT: int = lib.LMW_BUS_WAIT_TIMEOUT
WAIT_COUNTED: int = lib.LMW_BUS_WAIT_COUNTED
WAIT_CLOSED: int = lib.LMW_BUS_WAIT_CLOSED
WAIT_FAILED: int = lib.LMW_BUS_WAIT_FAILED
WAIT_PROTOCOL: int = lib.LMW_BUS_WAIT_PROTOCOL


class BusProtocolError(ValueError):
    """BusProtocolError: the bytes from Redis break RESP (the link is unusable)."""


Item = tuple[int, bytes, bytes]
"""Item is (DELIVER or UNJUDGED, channel, data) or (REPLY, b"", the frame)."""


class LinkBuffer:
    """LinkBuffer is one subscriber link's plain socket ``fd`` (TCP or unix; the caller
    keeps it open) and the read buffer lmw_bus_wait fills, in C.

    Raises:
        MemoryError: no memory for the buffer.
    """

    def __init__(self, fd: int) -> None:
        link = ffi.new("lmw_bus_link *")
        if lib.lmw_bus_link_init(link, fd, _LINK_BYTES) < 0:
            raise MemoryError("LinkBuffer: no memory for the read buffer")
        self.native: Any = ffi.gc(link, lib.lmw_bus_link_release)

    @property
    def heard(self) -> float:
        """heard is when this link last received a byte (time.monotonic()'s clock), 0 never."""
        return float(self.native.heard)


class Waited:
    """Waited is what one BusFilter.wait brought: its ``status`` (WAIT_*), the index of the
    link it is about (``which``), the ``items`` of that link for Python (WAIT_ITEMS), and
    ``error``, the errno of a failed read (WAIT_FAILED)."""

    __slots__ = ("error", "items", "status", "which")

    def __init__(self, status: int, which: int, items: list[Item], error: int) -> None:
        self.status, self.which, self.items, self.error = status, which, items, error


class BusFilter:
    """BusFilter judges the messages a node ``node_id`` receives; ``answers`` is its answer
    channel (left to Python). ``hub`` is the node's lmw_server (`CServer.native_hub`) or
    ffi.NULL: then users are not checked here.

    Raises:
        MemoryError: no memory for the filter.
    """

    def __init__(self, node_id: bytes, answers: bytes) -> None:
        if len(node_id) != 16:
            raise ValueError("BusFilter: a node id is 16 bytes")
        ptr = lib.lmw_bus_filter_new(node_id, answers, len(answers))
        if ptr == ffi.NULL:
            raise MemoryError("BusFilter: no memory for the filter")
        self._ptr = ffi.gc(ptr, lib.lmw_bus_filter_free)
        self._items = ffi.new("lmw_bus_item[]", _ITEMS)
        self._used = ffi.new("size_t *")
        self._counts = ffi.new("lmw_bus_counts *")
        self._which = ffi.new("size_t *")
        self.hub: Any = ffi.NULL

    def scan(
        self, buf: bytes | bytearray, start: int = 0, stop: int | None = None
    ) -> tuple[int, list[Item], bool]:
        """scan reads the complete frames of buf[start:stop] (stop: its end by default):
        returns (where the first frame not read begins, the items for Python in order (their
        bytes copied out of buf), more: True when the item array filled up and scan must be
        called again from there).

        Raises:
            BusProtocolError: the bytes break RESP.
        """
        used = self._used
        stop = len(buf) if stop is None else stop
        end = lib.lmw_bus_filter_scan(
            self._ptr,
            self.hub,
            ffi.from_buffer(buf),
            stop,
            start,
            self._items,
            _ITEMS,
            used,
            self._counts,
        )
        if end < 0:
            raise BusProtocolError("the subscriber link received bytes that are not RESP")
        return int(end), self._copy_items(buf, used[0]), used[0] == _ITEMS

    def wait(self, links: list[LinkBuffer], wake_fd: int, timeout: float) -> Waited:
        """wait blocks (GIL released) until a link brings something for Python, wake_fd is
        readable, a link fails, or timeout seconds pass; messages it drops meanwhile cost
        no Python. The items are copied out: the next wait may reuse the buffer."""
        array = ffi.new("lmw_bus_link *[]", [link.native for link in links])
        status = lib.lmw_bus_wait(
            self._ptr,
            self.hub,
            array,
            len(links),
            wake_fd,
            timeout,
            _REPORT_EVERY,
            self._items,
            _ITEMS,
            self._used,
            self._counts,
            self._which,
        )
        which = int(self._which[0])
        items: list[Item] = []
        error = 0
        if status == WAIT_ITEMS:
            link = links[which].native
            items = self._copy_items(ffi.buffer(link.buf, link.len), self._used[0])
        elif status < 0 and which < len(links):
            error = int(links[which].native.error)
        return Waited(int(status), which, items, error)

    def _copy_items(self, buf: Any, used: int) -> list[Item]:
        """The first used items of the last scan, their bytes copied out of buf."""
        items: list[Item] = []
        if used:
            view = memoryview(buf)
            for item in self._items[0:used]:
                at, size = item.data_at, item.data_len
                if item.kind == REPLY:
                    items.append((REPLY, b"", bytes(view[at : at + size])))
                else:
                    channel = bytes(view[item.channel_at : item.channel_at + item.channel_len])
                    items.append((item.kind, channel, bytes(view[at : at + size])))
            view.release()
        return items

    def judge(self, channel: bytes, data: bytes) -> bool:
        """judge: one message's verdict (for one hiredis parsed): True to go on to Python's
        own checks and decoding, False when dropped (counted)."""
        verdict = lib.lmw_bus_filter_judge(
            self._ptr, self.hub, channel, len(channel), data, len(data), self._counts
        )
        return bool(verdict != _DROP)

    def forget(self, channels: Iterable[bytes]) -> None:
        """forget the sequence numbers of channels (unsubscribed: numbering restarts)."""
        names = list(channels)
        if names:
            lengths = ffi.new("size_t[]", [len(name) for name in names])
            lib.lmw_bus_filter_forget(self._ptr, b"".join(names), lengths, len(names))

    def take_counts(self) -> tuple[int, int, int]:
        """take_counts: (unserved, duplicates, missed) since the last call."""
        counts = self._counts
        taken = (int(counts.unserved), int(counts.duplicates), int(counts.missed))
        if any(taken):
            counts.unserved = counts.duplicates = counts.missed = 0
        return taken
