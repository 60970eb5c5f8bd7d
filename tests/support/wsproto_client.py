"""A blocking WebSocket client: wsproto (an independent RFC 6455 implementation) on a socket.

wsproto is sans-I/O, so this module does the I/O: it connects a plain TCP socket, feeds the
bytes it receives to wsproto and sends the bytes wsproto produces. Every call is bounded by
the client's timeout. Messages come back as ``str`` (text) or ``bytes`` (binary), so a test
sees exactly what an application would.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Sequence

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.extensions import Extension

_RECV_CHUNK = 65536


class WsprotoClientError(RuntimeError):
    """WsprotoClientError: the handshake was refused, the peer went away, or a wait timed out."""


class WsprotoClient(contextlib.AbstractContextManager["WsprotoClient"]):
    """WsprotoClient is one client connection, opened (handshake done) by the constructor."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str = "/",
        timeout: float = 10.0,
        extensions: Sequence[Extension] = (),
        extra_headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._pending: list[Event] = []
        request = Request(
            host=f"{host}:{port}",
            target=path,
            extensions=list(extensions),
            extra_headers=list(extra_headers),
        )
        self._send(request)
        event = self.next_event()
        if not isinstance(event, AcceptConnection):
            self.sock.close()
            raise WsprotoClientError(f"handshake not accepted: {event!r}")
        self.accepted = event
        """accepted is the server's answer: its extensions (the ones wsproto now runs)."""

    def _send(self, event: Event) -> None:
        self.sock.sendall(self.ws.send(event))

    def send_message(self, data: str | bytes) -> None:
        """send_message sends one message: str as a text message, bytes as a binary one."""
        if isinstance(data, str):
            self._send(TextMessage(data=data))
        else:
            self._send(BytesMessage(data=data))

    def send_ping(self, payload: bytes) -> None:
        """send_ping sends a ping frame with payload (at most 125 bytes, RFC 6455 5.5)."""
        self._send(Ping(payload=payload))

    def next_event(self, timeout: float | None = None) -> Event:
        """next_event returns the next wsproto event, reading the socket as needed."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WsprotoClientError("timed out waiting for the server")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(_RECV_CHUNK)
            except TimeoutError as exc:
                raise WsprotoClientError("timed out waiting for the server") from exc
            self.ws.receive_data(data or None)  # b"" means the server closed the socket
            self._pending.extend(self.ws.events())
            if not data and not self._pending:
                raise WsprotoClientError("the server closed the TCP connection")
        return self._pending.pop(0)

    def receive_message(self, timeout: float | None = None) -> str | bytes:
        """receive_message returns the next whole message; pings met on the way get a pong."""
        deadline = time.monotonic() + (timeout or self.timeout)
        text: list[str] = []
        binary: list[bytes] = []
        while True:
            event = self.next_event(max(deadline - time.monotonic(), 0.001))
            if isinstance(event, Ping):
                self._send(event.response())
            elif isinstance(event, TextMessage):
                text.append(event.data)
                if event.message_finished:
                    return "".join(text)
            elif isinstance(event, BytesMessage):
                binary.append(bytes(event.data))
                if event.message_finished:
                    return b"".join(binary)
            elif isinstance(event, CloseConnection | RejectConnection):
                raise WsprotoClientError(
                    f"connection closed while waiting for a message: {event!r}"
                )

    def receive_pong(self, timeout: float | None = None) -> bytes:
        """receive_pong returns the payload of the next pong; any message before it is an error."""
        event = self.next_event(timeout)
        if not isinstance(event, Pong):
            raise WsprotoClientError(f"expected a pong, got {event!r}")
        return bytes(event.payload)

    def close(self, code: int = 1000, reason: str = "") -> CloseConnection:
        """close performs the closing handshake and returns the server's close event."""
        self._send(CloseConnection(code=code, reason=reason))
        deadline = time.monotonic() + self.timeout
        while True:
            event = self.next_event(max(deadline - time.monotonic(), 0.001))
            if isinstance(event, CloseConnection):
                self.sock.close()
                return event

    def wait_for_close(self, timeout: float | None = None) -> CloseConnection:
        """wait_for_close waits for the server to close, answers it, and returns its event."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            event = self.next_event(max(deadline - time.monotonic(), 0.001))
            if isinstance(event, CloseConnection):
                self.sock.sendall(self.ws.send(event.response()))
                self.sock.close()
                return event

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
