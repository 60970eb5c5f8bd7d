"""Errors of lowmemws; each carries what the peer gets (an HTTP status or a close code)."""

from __future__ import annotations


class LowMemWSError(Exception):
    """LowMemWSError is the base of every lowmemws error."""


class HandshakeError(LowMemWSError):
    """HandshakeError: a request head was refused; status is the HTTP status to answer."""

    def __init__(self, status: int) -> None:
        super().__init__(f"request refused with HTTP status {status}")
        self.status = status


class ProtocolError(LowMemWSError):
    """ProtocolError: the peer broke RFC 6455; close_code is the code to close with."""

    def __init__(self, close_code: int) -> None:
        super().__init__(f"WebSocket protocol error, close code {close_code}")
        self.close_code = close_code


class BusUnavailable(LowMemWSError):
    """BusUnavailable: a bus could not accept a publish (not started, closed, its link is gone
    or its outage buffer is full). Nothing was delivered anywhere, so a retry never duplicates;
    the gateway's publish calls pass it on to the application."""


class PresenceTimeout(LowMemWSError):
    """PresenceTimeout: a presence query (``online``) did not hear from every node within
    its timeout. ``count`` is the connections the nodes that answered hold, ``answered`` how
    many nodes answered and ``expected`` how many the bus reached (None when the query never
    left this process: the bus's link is down)."""

    def __init__(self, count: int, answered: int, expected: int | None) -> None:
        reached = "an unknown number of" if expected is None else str(expected)
        super().__init__(f"{answered} of {reached} nodes answered in time ({count} connections)")
        self.count = count
        self.answered = answered
        self.expected = expected


class TLSError(LowMemWSError):
    """TLSError: TLS was asked for but cannot be served: lowmemws was built without OpenSSL
    (install libssl-dev, then reinstall), or the certificate or key cannot be used (the message
    names the file and OpenSSL's reason)."""
