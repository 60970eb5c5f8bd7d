"""CloseCode: the close codes of RFC 6455 section 7.4.1 and the IANA registry, by name."""

from __future__ import annotations

import enum

from ._constants import CLOSE_REASON_MAX
from ._native import lib


class CloseCode(enum.IntEnum):
    """CloseCode names the WebSocket close codes (RFC 6455 section 7.4.1, IANA registry).

    An IntEnum, so it compares equal to the int that on_close receives. Connection.close
    sends only codes valid on the wire that lowmemws supports: 1000-1003, 1007-1011 and
    3000-4999; NO_STATUS_RCVD (1005), ABNORMAL_CLOSURE (1006) and TLS_HANDSHAKE (1015)
    are never sent, they only describe how a connection ended.
    """

    NORMAL_CLOSURE = 1000
    """The purpose of the connection was fulfilled."""
    GOING_AWAY = 1001
    """The server shuts down (what clients get on SIGTERM), or the client navigates away."""
    PROTOCOL_ERROR = 1002
    """The peer broke RFC 6455 (a bad frame, a bad close payload)."""
    UNSUPPORTED_DATA = 1003
    """A message of a type the endpoint cannot take."""
    NO_STATUS_RCVD = 1005
    """A close frame without a code arrived (never sent)."""
    ABNORMAL_CLOSURE = 1006
    """The connection ended without a close frame: EOF, reset, ping timeout (never sent)."""
    INVALID_FRAME_PAYLOAD_DATA = 1007
    """A text message (or close reason) that is not UTF-8."""
    POLICY_VIOLATION = 1008
    """A policy was broken: a slow consumer under the "close" policy, a message timeout."""
    MESSAGE_TOO_BIG = 1009
    """A message longer than Config.max_message_size."""
    MANDATORY_EXTENSION = 1010
    """The client needed an extension the server did not offer."""
    INTERNAL_ERROR = 1011
    """The server met an unexpected condition."""
    SERVICE_RESTART = 1012
    """The server restarts (IANA registry)."""
    TRY_AGAIN_LATER = 1013
    """The server is overloaded: its input budget was full (Config.spill_budget)."""
    BAD_GATEWAY = 1014
    """A gateway got an invalid response upstream (IANA registry)."""
    TLS_HANDSHAKE = 1015
    """The TLS handshake failed (never sent)."""


def close_reason_bytes(code: int, reason: str) -> bytes:
    """close_reason_bytes checks a close code and reason the server is about to send (RFC 6455
    sections 5.5.1 and 7.4) and returns the reason's UTF-8.

    Raises:
        ValueError: a code that may not be sent (only 1000-1003, 1007-1011 and 3000-4999
            may), or a reason longer than 123 bytes of UTF-8.
    """
    if not isinstance(code, int) or not lib.lmw_close_code_valid(code):
        raise ValueError(f"close code {code} may not be sent (RFC 6455 section 7.4)")
    raw = reason.encode("utf-8")
    if len(raw) > CLOSE_REASON_MAX:
        raise ValueError(f"close reason is longer than {CLOSE_REASON_MAX} bytes of UTF-8")
    return raw


__all__ = ["CloseCode", "close_reason_bytes"]
