"""lowmemws.client: an asyncio client of the envelope subprotocol that never loses a message.

It connects with the subprotocol ``lowmemws.v1`` (docs/envelope.md), remembers the last
position it handed over per stream, and after any disconnect reconnects (exponential
backoff with full jitter) naming those positions, so the gateway replays what it missed.
The application gets each stored message once, in offset order, and a `Refresh` where the
gateway could not fill a gap (history lost or too short): reload that state, then go on.
A link that stays silent longer than ``heartbeat_timeout`` (the gateway pings idle
connections every Config.ping_interval) is taken for dead and replaced.

Usage::

    async with Client("ws://host:8080/ws?token=...") as client:
        async for event in client:
            if isinstance(event, Refresh):
                reload(event.stream)
            else:
                show(event.data)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .codec import FrameReader, Message, accept_key, build_close, build_frame
from .errors import ProtocolError

__all__ = ["Client", "Delivery", "Refresh"]

_PROTOCOL = "lowmemws.v1"
_OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 1, 2, 8, 9, 10
_HEAD_LIMIT = 16384


@dataclass(frozen=True)
class Delivery:
    """Delivery is one message for the application: ``data`` (str for text, bytes for
    binary), and for a stored one its ``stream``, ``epoch`` and ``offset`` (None, "", 0 for
    one that was not stored)."""

    data: str | bytes
    stream: str | None = None
    epoch: str = ""
    offset: int = 0


@dataclass(frozen=True)
class Refresh:
    """Refresh says the messages of ``stream`` up to (``epoch``, ``offset``) could not all be
    delivered: reload the state they describe. Later messages follow it in order."""

    stream: str
    epoch: str
    offset: int


class Client:
    """Client holds one resumable connection to a gateway with history on.

    ``positions`` ({stream: (epoch, offset)}) resumes from a previous run; `positions`
    always holds the latest. ``heartbeat_timeout`` should exceed the gateway's
    ping_interval; ``backoff_base``/``backoff_cap`` bound the reconnect delays (seconds).

    Raises:
        ValueError: a URL that is not ws:// or wss://.
    """

    def __init__(
        self,
        url: str,
        *,
        positions: dict[str, tuple[str, int]] | None = None,
        heartbeat_timeout: float = 45.0,
        backoff_base: float = 0.2,
        backoff_cap: float = 10.0,
        connect_timeout: float = 10.0,
        max_queued: int = 10000,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError("Client: the URL must be ws:// or wss:// with a host")
        self._url = parts
        #: positions: the last position handed over per stream.
        self.positions: dict[str, tuple[str, int]] = dict(positions or {})
        self._heartbeat = heartbeat_timeout
        self._backoff = (backoff_base, backoff_cap)
        self._connect_timeout = connect_timeout
        self._events: asyncio.Queue[Delivery | Refresh] = asyncio.Queue(max_queued)
        self._awaiting: set[str] = set()  # streams whose replay or gap repair is running
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: connected is set while a connection is open; connects counts them.
        self.connected = asyncio.Event()
        #: synced is set once the gateway told the position of every stream of the current
        #: connection (after any replay): from then on no message of them can be missed.
        self.synced = asyncio.Event()
        self.connects = 0

    async def __aenter__(self) -> Client:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        """start begins connecting (and reconnecting) in a task of the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """close ends the connection (close code 1000) and stops reconnecting."""
        self._closing = True
        if self._writer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.write(build_close(1000, mask=os.urandom(4)))
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def drop_link(self) -> None:
        """drop_link closes the socket without a close frame, as a network failure would
        (the client then reconnects and resumes)."""
        if self._writer is not None:
            self._writer.transport.abort()

    async def send(self, data: str | bytes) -> None:
        """send sends one message (str as text, bytes as binary) on the current connection.

        Raises:
            ConnectionError: not connected now.
        """
        writer = self._writer
        if writer is None or not self.connected.is_set():
            raise ConnectionError("lowmemws.client: not connected")
        opcode = _OP_TEXT if isinstance(data, str) else _OP_BINARY
        payload = data.encode() if isinstance(data, str) else data
        writer.write(build_frame(opcode, payload, mask=os.urandom(4)))
        await writer.drain()

    def __aiter__(self) -> AsyncIterator[Delivery | Refresh]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Delivery | Refresh]:
        while True:
            yield await self._events.get()

    async def next(self, timeout: float | None = None) -> Delivery | Refresh:
        """next waits for the next event (at most timeout seconds).

        Raises:
            TimeoutError: none came in time.
        """
        return await asyncio.wait_for(self._events.get(), timeout)

    # -- connecting --------------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                reader, writer = await asyncio.wait_for(self._open(), self._connect_timeout)
            except (OSError, ProtocolError, asyncio.TimeoutError, ValueError):
                base, cap = self._backoff
                await asyncio.sleep(random.uniform(0, min(cap, base * 2**attempt)))
                attempt += 1
                continue
            attempt = 0
            try:
                await self._serve(reader, writer)
            except (OSError, ProtocolError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                pass
            finally:
                self.connected.clear()
                self.synced.clear()
                self._writer = None
                writer.close()

    def _target(self) -> str:
        path = self._url.path or "/"
        query = self._url.query
        # always sent ({} the first time): the gateway then tells the position of every
        # stream the connection joins, the baseline of the next resume
        resume = json.dumps({s: [e, o] for s, (e, o) in self.positions.items()})
        extra = "lmw_resume=" + urllib.parse.quote(resume, safe="")
        query = f"{query}&{extra}" if query else extra
        return f"{path}?{query}" if query else path

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        secure = self._url.scheme == "wss"
        port = self._url.port or (443 if secure else 80)
        context = ssl.create_default_context() if secure else None
        reader, writer = await asyncio.open_connection(self._url.hostname, port, ssl=context)
        key = base64.b64encode(os.urandom(16))
        # the positions are taken now: they are what the gateway replays after
        self._awaiting = set(self.positions)
        head = (
            f"GET {self._target()} HTTP/1.1\r\nHost: {self._url.netloc}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Protocol: {_PROTOCOL}\r\n\r\n"
        )
        writer.write(head.encode())
        response = await reader.readuntil(b"\r\n\r\n")
        lines = response.decode("latin-1").split("\r\n")
        if len(response) > _HEAD_LIMIT or not lines[0].startswith("HTTP/1.1 101"):
            writer.close()
            raise ConnectionError(f"lowmemws.client: upgrade refused: {lines[0]!r}")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        if headers.get("sec-websocket-accept") != accept_key(key).decode():
            writer.close()
            raise ConnectionError("lowmemws.client: bad Sec-WebSocket-Accept")
        if headers.get("sec-websocket-protocol") != _PROTOCOL:
            writer.close()
            raise ValueError("lowmemws.client: the gateway has no history (no lowmemws.v1)")
        return reader, writer

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.connects += 1
        self.connected.set()
        frames = FrameReader(require_mask=False, max_message=1 << 26)
        while True:
            data = await asyncio.wait_for(reader.read(65536), self._heartbeat)
            if not data:
                return
            for message in frames.feed(data):
                if not await self._control(message, writer):
                    return

    async def _control(self, message: Message, writer: asyncio.StreamWriter) -> bool:
        """Handle one frame; False once the connection is closing."""
        if message.opcode == _OP_PING:
            writer.write(build_frame(_OP_PONG, message.payload, mask=os.urandom(4)))
        elif message.opcode == _OP_CLOSE:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(build_close(1000, mask=os.urandom(4)))
            return False
        elif message.opcode in (_OP_TEXT, _OP_BINARY):
            await self._received(message)
        return True

    # -- the envelope ------------------------------------------------------------------------

    async def _received(self, message: Message) -> None:
        body = _envelope(message)
        if body is None:  # not an envelope (a paced send): handed over as it is
            raw = message.payload
            await self._events.put(Delivery(raw.decode() if message.opcode == _OP_TEXT else raw))
            return
        if "resumed" in body or "refresh" in body:
            await self._outcome(body)
            return
        if "synced" in body:
            self.synced.set()
            return
        if "resync" in body:  # the gateway may have missed messages: resume every stream
            await self._resync()
            return
        data: str | bytes = (
            str(body["d"]) if "d" in body else base64.b64decode(str(body.get("b", "")))
        )
        stream = body.get("s")
        if not isinstance(stream, str):
            await self._events.put(Delivery(data))
            return
        epoch, offset = str(body.get("e", "")), int(str(body.get("o", 0)))
        known = self.positions.get(stream)
        if known == ("", 0):
            known = None  # the stream had no message yet: any epoch continues it
        if known is not None and known[0] == epoch:
            if offset <= known[1]:
                return  # seen already
            if offset > known[1] + 1:
                await self._repair(stream, known)
                return  # the repair's replay brings it again, in order
        elif known is not None and stream in self._awaiting:
            return  # another epoch while a repair runs: its outcome says what to do
        elif known is not None:
            # a new epoch on a live link: the history was lost (e.g. Redis flushed)
            await self._events.put(Refresh(stream, epoch, offset - 1))
        self.positions[stream] = (epoch, offset)
        await self._events.put(Delivery(data, stream, epoch, offset))

    async def _outcome(self, body: dict[str, object]) -> None:
        resumed = "resumed" in body
        stream = str(body["resumed"] if resumed else body["refresh"])
        self._awaiting.discard(stream)
        epoch, offset = str(body.get("e", "")), int(str(body.get("o", 0)))
        known = self.positions.get(stream)
        ahead = known is not None and known[0] == epoch and known[1] >= offset
        if not resumed and not ahead:
            await self._events.put(Refresh(stream, epoch, offset))
            self.positions[stream] = (epoch, offset)
        elif resumed and (known is None or known == ("", 0) or (known[0] == epoch and not ahead)):
            self.positions[stream] = (epoch, offset)

    async def _resync(self) -> None:
        for stream, position in list(self.positions.items()):
            await self._repair(stream, position)

    async def _repair(self, stream: str, known: tuple[str, int]) -> None:
        """A gap on a live link (a message skipped by the write policy): ask for a replay."""
        if stream in self._awaiting or self._writer is None:
            return
        self._awaiting.add(stream)
        request = json.dumps({"lmw_resume": {stream: [known[0], known[1]]}})
        self._writer.write(build_frame(_OP_TEXT, request.encode(), mask=os.urandom(4)))


def _envelope(message: Message) -> dict[str, object] | None:
    if message.opcode != _OP_TEXT or not message.payload.startswith(b"{"):
        return None
    try:
        body = json.loads(message.payload)
    except ValueError:
        return None
    if not isinstance(body, dict) or not (
        {"d", "b", "resumed", "refresh", "synced", "resync"} & body.keys()
    ):
        return None
    return body
