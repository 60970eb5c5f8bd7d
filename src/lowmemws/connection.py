"""Connection: the application's handle to one WebSocket connection."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from ._bus_base import frame_data
from ._constants import OP_BINARY, OP_TEXT
from ._native import ffi
from ._user_ids import INT_USER_MAX, UserTag, is_long_tag
from ._wire_envelope import message_frame
from .close_codes import CloseCode, close_reason_bytes

if TYPE_CHECKING:
    from ._c_server import CServer


class SendResult(enum.Enum):
    """SendResult is what became of one message given to Connection.send.

    Only SENT is true in a boolean context, so ``if conn.send(data):`` reads "it went out".
    """

    SENT = "sent"
    """Written to the socket, or queued behind earlier output (delivered unless the
    connection fails)."""
    DROPPED = "dropped"
    """Not queued, by the write policy: the connection's output passed Config.write_limit
    (or all output passed Config.write_budget) under write_policy "drop"; under "close" the
    connection is also being closed with 1008. The connection may recover: try later."""
    GONE = "gone"
    """The connection is closing or closed, or this handle is stale: it never will recover."""

    def __bool__(self) -> bool:
        return self is SendResult.SENT


class Connection:
    """Connection is a handle (fd, generation) to a WebSocket connection.

    It holds no resources: the connection's state lives in the C slot table. A handle
    kept after the connection closed is stale: its fd may already serve someone else, but
    the generation no longer matches, so send() returns SendResult.GONE and nothing is
    written.
    Every method is safe to call from any thread.
    """

    __slots__ = ("_server", "fd", "gen", "_user")

    def __init__(self, server: CServer, fd: int, gen: int, user: int | str = 0) -> None:
        self._server = server
        self.fd = fd
        self.gen = gen
        self._user = user  # what the Accept gave (on_open), else the slot's 64-bit tag

    @property
    def user(self) -> int | str | UserTag:
        """user is the user id that Accept(user=...) gave, 0 for none, in every hook.

        An int id and a str id up to 9 characters of ``[0-9A-Za-z_-]`` (or 7 bytes of UTF-8)
        are kept in the connection's 64-bit tag and cost nothing. A longer str id is read from
        the process's table of the long ids online there: one entry per user (not per
        connection) of its length plus a few bytes, gone with the user's last connection
        here (docs/presence.md). A handle read after that gives a `lowmemws.UserTag`, which
        reaches the same connections with send_to_user, online and disconnect_user.
        """
        user = self._user
        if isinstance(user, str) or user <= INT_USER_MAX:
            return user
        if is_long_tag(user):
            name = self._server.user_name(user)
            return name if name is not None else UserTag(user)
        return self._server.user_ids.user(user)

    def send(self, data: str | bytes | bytearray | memoryview) -> SendResult:
        """send sends one message: str as text, bytes as binary (RFC 6455 section 5.6).

        Returns SendResult.SENT (written or queued), DROPPED (refused by the write policy:
        Config.write_limit, write_budget, write_policy) or GONE (the connection is closing
        or closed). Only SENT is true, so ``if not conn.send(data)`` catches both failures.
        It never raises for a closed connection: a handle may outlive its connection.
        """
        opcode, payload = _payload(data)
        if self._server.envelopes and self._server.is_envelope(self.fd, self.gen):
            envelope = message_frame(opcode, bytes(ffi.buffer(payload)) if not isinstance(
                payload, bytes) else payload)  # fmt: skip
            return self._server.send(self.fd, self.gen, OP_TEXT, envelope)
        return self._server.send(self.fd, self.gen, opcode, payload)

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> bool:
        """close starts the closing handshake with code and reason (RFC 6455 section 7).

        code must be valid on the wire (1000-1003, 1007-1011, 3000-4999); reason at most
        123 bytes of UTF-8. Returns False when the connection is no longer open.

        Raises:
            ValueError: a code that may not be sent, or a reason that is too long.
        """
        return self._server.close(self.fd, self.gen, code, close_reason_bytes(code, reason))

    def subscribe(self, topic: str) -> bool:
        """subscribe adds this connection to topic; it leaves it when it closes."""
        return self._server.subscribe(self.fd, self.gen, topic)

    def unsubscribe(self, topic: str) -> bool:
        """unsubscribe removes this connection from topic."""
        return self._server.unsubscribe(self.fd, self.gen, topic)

    @property
    def is_open(self) -> bool:
        """is_open reports whether the connection is open (not closing, not gone)."""
        return self._server.connection_is_open(self.fd, self.gen)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Connection) and (self.fd, self.gen) == (other.fd, other.gen)

    def __hash__(self) -> int:
        return hash((self.fd, self.gen))

    def __repr__(self) -> str:
        return f"<Connection fd={self.fd} gen={self.gen} user={self.user!r}>"


def _payload(data: str | bytes | bytearray | memoryview) -> tuple[int, Any]:
    """_payload is (opcode, payload) for lmw_send; a binary buffer is passed without a copy,
    so a message the write bounds refuse costs nothing (C decides before copying)."""
    if isinstance(data, (bytearray, memoryview)):
        return OP_BINARY, ffi.from_buffer(data)
    return frame_data(data)


__all__ = ["Connection", "SendResult"]
