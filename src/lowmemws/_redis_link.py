"""SubscriberLink: one pub/sub connection to a redis-server, read without polling.

Theory of operation. redis-py opens the connection (URL, AUTH, TLS, SELECT) and then hands
its socket over: the link writes (S)SUBSCRIBE, (S)UNSUBSCRIBE and PING itself. What comes
back is read in big chunks (as many messages per recv as the socket holds) and walked in C
by the bus's `lowmemws._bus_filter.BusFilter`, which drops the messages this node does not
serve without a Python object each; the other replies (confirmations, PONGs, errors) go to
hiredis whole. The bus thread waits on the sockets and a wake-up pipe, with a timeout that
is the next thing due (a keepalive PING, a PONG deadline): an idle link wakes once per
``keepalive`` seconds, not several times a second.

Links on plain sockets (TCP, unix) are waited on, read and judged in C with the GIL released
(`BusFilter.wait`): Python runs only for what the filter keeps, a wake-up, a failure or the
next keepalive, so a message the node does not serve costs no Python. A TLS link's bytes
must go through Python's ssl: with one, every link is read here (select, recv_into, scan).

Liveness: when nothing has arrived for ``keepalive`` seconds the link sends PING and expects
the PONG within ``reply_timeout``; otherwise it is dead (`LinkDead`). A dead link is
therefore noticed within ``keepalive + reply_timeout`` seconds of its last sign of life, and
a link Redis or the network closes is noticed at once (end of stream). Redis never closes a
pub/sub client for idleness (its ``timeout`` spares them), so the PING is for our side.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any

from ._bus_filter import (
    DELIVER,
    REPLY,
    WAIT_CLOSED,
    WAIT_FAILED,
    WAIT_ITEMS,
    WAIT_PROTOCOL,
    WAIT_WOKEN,
    BusFilter,
    BusProtocolError,
    Item,
    LinkBuffer,
)

__all__ = ["LinkDead", "SubscriberLink", "wait_links"]

_RECV_BYTES = 256 * 1024
_READY_TOKEN = b"lowmemws-ready"
_SUBSCRIBE_BATCH = 1024  # channels per command: bounded request size


class LinkDead(ConnectionError):
    """LinkDead: the subscriber link closed or stopped answering PING."""


OnMessage = Callable[[bytes, bytes, bool], None]
"""OnMessage(channel, data, judged) is called for each pub/sub message the filter keeps, in
the link's thread; judged: the filter checked its origin, sequence number and user."""


class SubscriberLink:
    """SubscriberLink is one subscribed connection (see the module docstring).

    ``connection`` is a connected redis-py Connection; ``bus_filter`` judges the messages
    (one filter for every link of a bus); ``sharded`` chooses SSUBSCRIBE (True)
    or SUBSCRIBE; ``one_per_command`` sends one channel per command (a cluster refuses
    channels of different slots in one SSUBSCRIBE). `on_ready` runs once every command sent
    before the last `mark` has been answered (the subscriptions are in place). An
    unsubscribe the server sends by itself (its slot moved to another shard, or the shard
    became a replica) ends the link (`LinkDead`): the bus then rebuilds its links from the
    cluster's new slot map.
    """

    def __init__(
        self,
        connection: Any,
        sharded: bool,
        on_message: OnMessage,
        bus_filter: BusFilter,
        *,
        keepalive: float,
        reply_timeout: float,
        one_per_command: bool = False,
    ) -> None:
        import hiredis

        self._connection = connection
        self._sock: socket.socket = connection._sock
        self._pending: Callable[[], int] = getattr(self._sock, "pending", lambda: 0)  # TLS
        self._reader = hiredis.Reader()
        self._sharded = sharded
        self._on_message = on_message
        #: filter judges the messages of every link of the bus
        self.filter = bus_filter
        #: native: the link's read buffer in C (a plain socket), None for a TLS socket
        self.native = None if isinstance(self._sock, ssl.SSLSocket) else LinkBuffer(self.fileno())
        # read() (a TLS link's path) lands in one reused buffer, made on its first use; an
        # incomplete frame moves to its front
        self._buf = bytearray()
        self._kept = 0  # bytes at the front: the start of a frame the next read completes
        self._keepalive = keepalive
        self._reply_timeout = reply_timeout
        self._heard = time.monotonic()
        self._ping_deadline: float | None = None
        self._marks = 0
        self._one_per_command = one_per_command
        self._leaving: set[bytes] = set()  # our own unsubscribes not yet confirmed
        self.on_ready: Callable[[], None] = lambda: None
        self.channels: set[str] = set()

    def subscribe(self, channels: Iterable[str]) -> None:
        """subscribe adds channels (those not subscribed yet)."""
        new = sorted(set(channels) - self.channels)
        self.channels.update(new)
        self._send_batches("SSUBSCRIBE" if self._sharded else "SUBSCRIBE", new)

    def unsubscribe(self, channels: Iterable[str]) -> None:
        """unsubscribe drops channels (those subscribed)."""
        gone = sorted(self.channels.intersection(channels))
        self.channels.difference_update(gone)
        self._leaving.update(channel.encode() for channel in gone)
        self._send_batches("SUNSUBSCRIBE" if self._sharded else "UNSUBSCRIBE", gone)

    def mark(self) -> None:
        """mark asks for `on_ready` once everything sent so far is answered."""
        self._marks += 1
        self._send(("PING", _READY_TOKEN))

    def due(self) -> float:
        """due is when this link next needs attention (a keepalive PING, a PONG deadline)."""
        return self._ping_deadline or self._heard + self._keepalive

    def pending(self) -> bool:
        """pending: a TLS socket holds decrypted bytes select cannot see."""
        return bool(self._pending())

    def fileno(self) -> int:
        """fileno is the socket's descriptor, for select."""
        return self._sock.fileno()

    def close(self) -> None:
        """close disconnects (the server drops the subscriptions)."""
        self._connection.disconnect()

    # -- inside ------------------------------------------------------------------------------

    def _send_batches(self, command: str, channels: list[str]) -> None:
        step = 1 if self._one_per_command else _SUBSCRIBE_BATCH
        commands = [(command, *channels[i : i + step]) for i in range(0, len(channels), step)]
        if commands:
            self._connection.send_packed_command(self._connection.pack_commands(commands), False)

    def _send(self, args: tuple[Any, ...]) -> None:
        self._connection.send_packed_command(self._connection.pack_command(*args), False)

    def read(self) -> None:
        """read handles what the socket has: messages, confirmations, PONGs.

        Raises:
            LinkDead: the link closed, refused a command or lost a channel by itself.
            OSError: the socket failed.
        """
        if not self._buf:
            self._buf.extend(bytes(_RECV_BYTES))
        buf, kept = self._buf, self._kept
        if kept == len(buf):  # one frame larger than the buffer: make room for its rest
            buf.extend(bytes(len(buf)))
        if kept:
            with memoryview(buf) as view:
                received = self._sock.recv_into(view[kept:])
        else:
            received = self._sock.recv_into(buf)
        if not received:
            raise LinkDead("the server closed the subscriber link")
        self._heard = time.monotonic()
        self._ping_deadline = None
        stop = kept + received
        at, more = 0, True
        while more:
            try:
                at, items, more = self.filter.scan(buf, at, stop)
            except BusProtocolError as exc:
                raise LinkDead(str(exc)) from None
            self.handle(items)
        self._kept = stop - at
        if self._kept:
            buf[: self._kept] = buf[at:stop]
        if len(buf) > _RECV_BYTES and self._kept <= _RECV_BYTES:  # the large frame is done
            del buf[_RECV_BYTES:]

    def handle(self, items: list[Item]) -> None:
        """handle passes what the filter kept on: messages to on_message, replies to hiredis.

        Raises:
            LinkDead: a reply says the link is unusable (see `read`).
        """
        on_message = self._on_message
        for kind, channel, payload in items:
            if kind == REPLY:
                self._reply(payload)
            else:
                on_message(channel, payload, kind == DELIVER)

    def heard_natively(self) -> None:
        """heard_natively takes in when the C loop last received a byte on this link."""
        assert self.native is not None
        heard = self.native.heard
        if heard > self._heard:
            self._heard = heard
            self._ping_deadline = None

    def _reply(self, frame: bytes) -> None:
        """A whole reply other than a message the filter recognised, parsed by hiredis."""
        reader = self._reader
        reader.feed(frame)
        while (reply := reader.gets()) is not False:
            if isinstance(reply, list) and reply[0] in (b"smessage", b"message"):
                if len(reply) == 3 and isinstance(reply[1], bytes):
                    self._on_message(reply[1], reply[2], False)
            elif isinstance(reply, Exception):
                raise LinkDead(f"Redis refused a subscriber command: {reply}")
            elif isinstance(reply, list) and reply[0] in (b"sunsubscribe", b"unsubscribe"):
                self._confirm_leave(reply[1])
            elif reply == _READY_TOKEN or (
                isinstance(reply, list) and reply[1:2] == [_READY_TOKEN]
            ):
                # RESP3 answers PING with the bare token, RESP2 with ["pong", token]
                self._marks -= 1
                if self._marks == 0:
                    self.on_ready()

    def _confirm_leave(self, channel: bytes | None) -> None:
        if channel in self._leaving:
            self._leaving.discard(channel)
        elif channel is not None:
            raise LinkDead(f"the server unsubscribed {channel!r} (slot moved?)")

    def keep_alive(self) -> None:
        """keep_alive PINGs a silent link and ends one that missed its PONG deadline.

        Raises:
            LinkDead: no PONG within the reply timeout.
        """
        now = time.monotonic()
        if self._ping_deadline is not None:
            if now > self._ping_deadline:
                raise LinkDead(f"no PONG within {self._reply_timeout} s")
        elif now - self._heard >= self._keepalive:
            self._send(("PING",))
            self._ping_deadline = now + self._reply_timeout


def wait_links(links: list[SubscriberLink], timeout: float, wake_fd: int) -> bool:
    """wait_links blocks until a link's socket or wake_fd is readable, a link needs a
    keepalive, or timeout; handles what arrived on every link. Returns True when wake_fd is
    readable.

    Raises:
        LinkDead: a link closed, refused a command, lost a channel or missed its PONG.
        OSError: a socket failed.
    """
    if links and all(link.native is not None for link in links):
        return _wait_natively(links, timeout, wake_fd)
    now = time.monotonic()
    soonest = min((link.due() for link in links), default=now + timeout)
    ready_now = [link for link in links if link.pending()]
    wait = 0.0 if ready_now else max(0.0, min(timeout, soonest - now))
    fds = [link.fileno() for link in links]
    readable, _, _ = select.select([*fds, wake_fd], [], [], wait)
    for link, fd in zip(links, fds, strict=True):
        if fd in readable or link in ready_now:
            link.read()
        link.keep_alive()
    return wake_fd in readable


def _wait_natively(links: list[SubscriberLink], timeout: float, wake_fd: int) -> bool:
    """wait_links for links on plain sockets: the C loop waits, reads and drops; Python
    handles only what it returns."""
    soonest = min(link.due() for link in links)
    wait = max(0.0, min(timeout, soonest - time.monotonic()))
    waited = links[0].filter.wait([link.native for link in links if link.native], wake_fd, wait)
    for link in links:
        link.heard_natively()
    status = waited.status
    if status == WAIT_ITEMS:
        links[waited.which].handle(waited.items)
    elif status == WAIT_CLOSED:
        raise LinkDead("the server closed the subscriber link")
    elif status == WAIT_PROTOCOL:
        raise LinkDead("the subscriber link received bytes that are not RESP")
    elif status == WAIT_FAILED:
        raise OSError(waited.error, os.strerror(waited.error))
    elif status < 0:
        raise OSError(errno.EIO, f"the subscriber's wait failed (status {status})")
    for link in links:
        link.keep_alive()
    return status == WAIT_WOKEN
