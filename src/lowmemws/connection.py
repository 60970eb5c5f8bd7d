"""Connection: the application's handle to one WebSocket connection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._bus_base import OPCODE_BINARY, frame_data
from ._native import ffi, lib

if TYPE_CHECKING:
    from .server import Gateway


class Connection:
    """Connection is a handle (fd, generation) to a WebSocket connection.

    It holds no resources: the connection's state lives in the C slot table. A handle
    kept after the connection closed is stale: its fd may already serve someone else, but
    the generation no longer matches, so send() returns False and nothing is written.
    Every method is safe to call from any thread.
    """

    __slots__ = ("_gateway", "fd", "gen", "user")

    def __init__(self, gateway: Gateway, fd: int, gen: int, user: int = 0) -> None:
        self._gateway = gateway
        self.fd = fd
        self.gen = gen
        self.user = user
        """user is the 64-bit user tag given by Accept(user=...), 0 for none."""

    def send(self, data: str | bytes | bytearray | memoryview) -> bool:
        """send sends one message: str as text, bytes as binary (RFC 6455 section 5.6).

        Returns True when written or queued, False when the connection is gone or the
        message was dropped by the write policy (Config.write_limit, write_policy).
        """
        server = self._gateway._server
        if server is None:
            return False
        opcode, payload = _payload(data)
        return bool(lib.lmw_send(server, self.fd, self.gen, opcode, payload, len(payload)) > 0)

    def close(self, code: int = 1000, reason: str = "") -> bool:
        """close starts the closing handshake with code and reason (RFC 6455 section 7).

        code must be valid on the wire (1000-1003, 1007-1011, 3000-4999); reason at most
        123 bytes of UTF-8. Returns False when the connection is no longer open.
        """
        if not lib.lmw_close_code_valid(code):
            raise ValueError(f"close code {code} may not be sent (RFC 6455 section 7.4)")
        raw = reason.encode("utf-8")
        if len(raw) > 123:
            raise ValueError("close reason is longer than 123 bytes of UTF-8")
        server = self._gateway._server
        if server is None:
            return False
        return bool(lib.lmw_close(server, self.fd, self.gen, code, raw, len(raw)) == 0)

    def subscribe(self, topic: str) -> bool:
        """subscribe adds this connection to topic; it leaves it when it closes."""
        return self._gateway.subscribe(self, topic)

    def unsubscribe(self, topic: str) -> bool:
        """unsubscribe removes this connection from topic."""
        return self._gateway.unsubscribe(self, topic)

    @property
    def is_open(self) -> bool:
        """is_open reports whether the connection is open (not closing, not gone)."""
        server = self._gateway._server
        return server is not None and bool(lib.lmw_is_open(server, self.fd, self.gen))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Connection) and (self.fd, self.gen) == (other.fd, other.gen)

    def __hash__(self) -> int:
        return hash((self.fd, self.gen))

    def __repr__(self) -> str:
        return f"<Connection fd={self.fd} gen={self.gen} user={self.user}>"


def _payload(data: str | bytes | bytearray | memoryview) -> tuple[int, Any]:
    """_payload is (opcode, payload) for lmw_send; a binary buffer is passed without a copy,
    so a message the write bounds refuse costs nothing (C decides before copying)."""
    if isinstance(data, (bytearray, memoryview)):
        return OPCODE_BINARY, ffi.from_buffer(data)
    return frame_data(data)


__all__ = ["Connection"]
