"""codec: a small typed layer over the C codec (lmw.h, "HTTP request head" and "Frames").

Sans-I/O: bytes in, values out. The server runs the same C functions on pooled buffers
without this layer; tests, tools and Python code that needs the rules use it. Values
returned here are copies (bytes), never views into a caller's buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._native import ffi, lib
from .errors import HandshakeError, ProtocolError

__all__ = [
    "KNOWN_HEADERS",
    "KIND_HTTP",
    "KIND_UPGRADE",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "Frame",
    "FrameHeader",
    "FrameReader",
    "Message",
    "ParsedRequest",
    "RequestParser",
    "Utf8Validator",
    "accept_key",
    "build_101",
    "build_close",
    "build_frame",
    "close_code_valid",
    "parse_close",
    "parse_frame",
    "parse_request",
    "reject_response",
    "unmask",
    "validate_utf8",
]

KIND_HTTP: int = lib.LMW_KIND_HTTP
KIND_UPGRADE: int = lib.LMW_KIND_UPGRADE
OP_CONTINUATION: int = lib.LMW_OP_CONTINUATION
OP_TEXT: int = lib.LMW_OP_TEXT
OP_BINARY: int = lib.LMW_OP_BINARY
OP_CLOSE: int = lib.LMW_OP_CLOSE
OP_PING: int = lib.LMW_OP_PING
OP_PONG: int = lib.LMW_OP_PONG

DEFAULT_MAX_HEAD = 8192
DEFAULT_MAX_MESSAGE = 1 << 20

#: Lowercase names of the headers the C parser finds during the parse, by LMW_H_* index.
KNOWN_HEADERS: tuple[bytes, ...] = (
    b"host",
    b"upgrade",
    b"connection",
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-protocol",
    b"sec-websocket-extensions",
    b"origin",
    b"cookie",
    b"authorization",
    b"content-length",
    b"transfer-encoding",
)


# ---------------------------------------------------------------------------------------
# HTTP request head (RFC 7230 section 3, RFC 6455 section 4.2.1)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """ParsedRequest is an accepted request head, copied out of the parsed buffer."""

    kind: int
    head_len: int
    method: bytes
    target: bytes
    path: bytes
    query: bytes
    minor_version: int
    content_length: int
    known: dict[bytes, bytes]
    """Values of the KNOWN_HEADERS present, by lowercase name (first occurrence)."""
    headers: list[tuple[bytes, bytes]]
    """Every header field in order, names as sent, values trimmed."""

    @property
    def is_upgrade(self) -> bool:
        """is_upgrade: the head is a valid WebSocket upgrade (RFC 6455 4.2.1)."""
        return self.kind == KIND_UPGRADE

    def header(self, name: bytes) -> bytes | None:
        """header returns the first value of name (any case), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


def _span(data: bytes, span: Any) -> bytes:
    off: int = span.off
    end: int = off + span.len
    return data[off:end]


def _request_from(data: bytes, r: Any, head_len: int) -> ParsedRequest:
    present: int = r.present
    known = {
        name: _span(data, r.headers[i])
        for i, name in enumerate(KNOWN_HEADERS)
        if present & (1 << i)
    }
    headers: list[tuple[bytes, bytes]] = []
    pos = ffi.new("uint32_t *", 0)
    name = ffi.new("lmw_span *")
    value = ffi.new("lmw_span *")
    while lib.lmw_header_next(data, head_len, pos, name, value):
        headers.append((_span(data, name), _span(data, value)))
    return ParsedRequest(
        kind=r.kind,
        head_len=head_len,
        method=_span(data, r.method),
        target=_span(data, r.target),
        path=_span(data, r.path),
        query=_span(data, r.query),
        minor_version=r.minor_version,
        content_length=r.content_length,
        known=known,
        headers=headers,
    )


class RequestParser:
    """RequestParser reads one request head from bytes that arrive in pieces.

    The search for the end of the head resumes where the previous call stopped, so a
    client that sends a byte at a time is never rescanned (lmw_request.scanned).
    """

    def __init__(self, max_head: int = DEFAULT_MAX_HEAD) -> None:
        self.max_head = max_head
        self._buffer = bytearray()
        self._req = ffi.new("lmw_request *")

    def feed(self, data: bytes) -> ParsedRequest | None:
        """feed adds data; returns the request once its head is complete, else None.

        Raises HandshakeError(status) when the head must be refused.
        """
        self._buffer += data
        whole = bytes(self._buffer)
        rc = lib.lmw_parse_request(whole, len(whole), self.max_head, self._req)
        if rc == lib.LMW_INCOMPLETE:
            return None
        if rc == lib.LMW_ERROR:
            raise HandshakeError(self._req.status)
        return _request_from(whole, self._req, rc)

    @property
    def scanned(self) -> int:
        """scanned: how many bytes the search for the end of the head has covered."""
        value: int = self._req.scanned
        return value


def parse_request(data: bytes, max_head: int = DEFAULT_MAX_HEAD) -> ParsedRequest | None:
    """parse_request parses a request head; None when data holds only part of it.

    Raises HandshakeError(status) with the status the client should get.
    """
    return RequestParser(max_head).feed(data)


def accept_key(key: bytes) -> bytes:
    """accept_key returns Sec-WebSocket-Accept for key (RFC 6455 section 4.2.2)."""
    out = ffi.new("uint8_t[28]")
    lib.lmw_accept_key(key, len(key), out)
    return bytes(ffi.buffer(out))


def build_101(key: bytes, protocol: bytes = b"", pmd: int = 0) -> bytes:
    """build_101 returns the 101 Switching Protocols response for key (pmd: a
    negotiate_deflate result, accepting permessage-deflate when not 0).

    Raises ValueError when protocol is not a token (it would inject a header).
    """
    cap = 384 + len(protocol)
    out = ffi.new("uint8_t[]", cap)
    n = lib.lmw_build_101(key, len(key), protocol, len(protocol), pmd, out, cap)
    if n < 0:
        raise ValueError(f"invalid subprotocol {protocol!r}")
    return bytes(ffi.buffer(out, n))


def negotiate_deflate(offers: bytes) -> int:
    """negotiate_deflate answers one Sec-WebSocket-Extensions value (RFC 7692 section 7.1):
    0 when no permessage-deflate offer in it can be accepted, else LMW_PMD_ACCEPT plus the
    server_max_window_bits the accepted offer asked for (0: none)."""
    return int(lib.lmw_pmd_negotiate(offers, len(offers)))


def reject_response(status: int) -> bytes | None:
    """reject_response returns the prebuilt response for an HTTP error status, or None."""
    size = ffi.new("size_t *")
    ptr = lib.lmw_reject_response(status, size)
    if ptr == ffi.NULL:
        return None
    return bytes(ffi.buffer(ptr, size[0]))


# ---------------------------------------------------------------------------------------
# Frames (RFC 6455 section 5)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """FrameHeader is one parsed frame header (RFC 6455 section 5.2)."""

    fin: bool
    rsv: int
    opcode: int
    masked: bool
    mask: bytes
    payload_len: int
    header_len: int


@dataclass(frozen=True, slots=True)
class Frame:
    """Frame is a whole frame: its header and its unmasked payload."""

    header: FrameHeader
    payload: bytes


@dataclass(frozen=True, slots=True)
class Message:
    """Message is a complete data message (text or binary) or a control frame."""

    opcode: int
    payload: bytes


def _header_from(f: Any) -> FrameHeader:
    return FrameHeader(
        fin=bool(f.fin),
        rsv=f.rsv,
        opcode=f.opcode,
        masked=bool(f.masked),
        mask=bytes(f.mask) if f.masked else b"",
        payload_len=f.payload_len,
        header_len=f.header_len,
    )


def parse_frame_header(
    data: bytes, *, require_mask: bool = True, rsv_allowed: int = 0
) -> FrameHeader | None:
    """parse_frame_header parses the header at the start of data; None if incomplete.

    Raises ProtocolError(1002) for a header RFC 6455 forbids.
    """
    f = ffi.new("lmw_frame *")
    rc = lib.lmw_parse_frame(data, len(data), rsv_allowed, int(require_mask), f)
    if rc == lib.LMW_INCOMPLETE:
        return None
    if rc == lib.LMW_ERROR:
        raise ProtocolError(f.close_code)
    return _header_from(f)


def parse_frame(data: bytes, *, require_mask: bool = True, rsv_allowed: int = 0) -> Frame | None:
    """parse_frame parses one whole frame at the start of data; None if incomplete.

    The payload is returned unmasked. Raises ProtocolError(1002) like parse_frame_header.
    """
    header = parse_frame_header(data, require_mask=require_mask, rsv_allowed=rsv_allowed)
    if header is None or header.header_len + header.payload_len > len(data):
        return None
    payload = data[header.header_len : header.header_len + header.payload_len]
    if header.masked:
        payload = unmask(payload, header.mask)
    return Frame(header, payload)


def unmask(data: bytes, mask: bytes, phase: int = 0) -> bytes:
    """unmask returns data XORed with the 4-byte mask, data starting at payload offset phase.

    Masking and unmasking are the same operation (RFC 6455 section 5.3).
    """
    if len(mask) != 4:
        raise ValueError("a masking key has 4 bytes")
    buf = bytearray(data)
    lib.lmw_unmask(ffi.from_buffer(buf), len(buf), mask, phase)
    return bytes(buf)


def build_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None) -> bytes:
    """build_frame returns a frame: unmasked as a server sends it, or masked with mask
    (4 bytes) as a client sends it."""
    header = ffi.new("uint8_t[10]")
    n = lib.lmw_build_header(header, int(fin), opcode, len(payload))
    head = bytes(ffi.buffer(header, n))
    if mask is None:
        return head + payload
    head = head[:1] + bytes([head[1] | 0x80]) + head[2:] + mask
    return head + unmask(payload, mask)


def close_code_valid(code: int) -> bool:
    """close_code_valid: code may appear in a close frame (RFC 6455 section 7.4)."""
    return bool(lib.lmw_close_code_valid(code))


def build_close(code: int, reason: str = "", mask: bytes | None = None) -> bytes:
    """build_close returns a close frame; ValueError for an invalid code or a reason
    longer than 123 bytes of UTF-8."""
    raw = reason.encode("utf-8")
    out = ffi.new("uint8_t[]", lib.LMW_CONTROL_PAYLOAD_MAX)
    n = lib.lmw_build_close_payload(out, code, raw, len(raw))
    if n < 0:
        raise ValueError(f"invalid close code {code} or reason {reason!r}")
    return build_frame(OP_CLOSE, bytes(ffi.buffer(out, n)), mask=mask)


def parse_close(payload: bytes) -> tuple[int, str]:
    """parse_close returns (code, reason) of a close payload; code 1005 when empty.

    Raises ProtocolError(1002) for a bad code or length, ProtocolError(1007) for a
    reason that is not UTF-8 (RFC 6455 section 5.5.1).
    """
    code = ffi.new("uint16_t *")
    rc = lib.lmw_parse_close(payload, len(payload), code)
    if rc:
        raise ProtocolError(rc)
    return int(code[0]), payload[2:].decode("utf-8")


# ---------------------------------------------------------------------------------------
# UTF-8 (RFC 3629)
# ---------------------------------------------------------------------------------------


class Utf8Validator:
    """Utf8Validator checks UTF-8 that arrives in pieces, failing at the first bad byte."""

    def __init__(self) -> None:
        self._state = ffi.new("uint32_t *", lib.LMW_UTF8_ACCEPT)

    def feed(self, data: bytes) -> int:
        """feed returns -1 while every byte is valid, else the offset in data of the
        first invalid byte."""
        offset: int = lib.lmw_utf8_check(self._state, data, len(data))
        return offset

    @property
    def complete(self) -> bool:
        """complete: the bytes so far end between characters."""
        return bool(self._state[0] == lib.LMW_UTF8_ACCEPT)


def validate_utf8(data: bytes) -> int:
    """validate_utf8 returns -1 for valid UTF-8, else the offset of the first invalid
    byte (len(data) when the text ends inside a character)."""
    validator = Utf8Validator()
    offset = validator.feed(data)
    if offset < 0 and not validator.complete:
        return len(data)
    return offset


# ---------------------------------------------------------------------------------------
# A byte stream of client frames
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Current:
    header: FrameHeader
    opcode: int
    fin: bool
    remaining: int
    done: int = 0
    control: bytearray = field(default_factory=bytearray)


class FrameReader:
    """FrameReader turns a byte stream into messages with the server's rules.

    Frames are checked as their header arrives, text is validated as its bytes arrive
    (1007 at the first bad byte, across fragments), only pending bytes are kept.
    Raises ProtocolError(close_code) on the first violation.
    """

    def __init__(
        self,
        max_message: int = DEFAULT_MAX_MESSAGE,
        *,
        require_mask: bool = True,
        rsv_allowed: int = 0,
    ) -> None:
        self.max_message = max_message
        self.require_mask = require_mask
        self.rsv_allowed = rsv_allowed
        self._pending = bytearray()
        self._frame = ffi.new("lmw_frame *")
        self._message = ffi.new("lmw_message_state *")
        self._data = bytearray()
        self._current: _Current | None = None

    @property
    def pending(self) -> int:
        """pending: bytes kept because they belong to an incomplete frame header."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[Message]:
        """feed consumes data and returns the messages and control frames it completes."""
        self._pending += data
        out: list[Message] = []
        while True:
            if self._current is None and not self._start_frame():
                return out
            assert self._current is not None
            if not self._take_payload(out):
                return out

    def _start_frame(self) -> bool:
        f = self._frame
        buf = bytes(self._pending)
        rc = lib.lmw_parse_frame(buf, len(buf), self.rsv_allowed, int(self.require_mask), f)
        if rc == lib.LMW_INCOMPLETE:
            return False
        if rc == lib.LMW_ERROR:
            raise ProtocolError(f.close_code)
        code = lib.lmw_message_frame(self._message, f, self.max_message)
        if code:
            raise ProtocolError(code)
        del self._pending[:rc]
        self._current = _Current(
            header=_header_from(f),
            opcode=f.opcode,
            fin=bool(f.fin),
            remaining=f.payload_len,
        )
        return True

    def _take_payload(self, out: list[Message]) -> bool:
        cur = self._current
        assert cur is not None
        header = cur.header
        take = min(cur.remaining, len(self._pending))
        chunk = bytes(self._pending[:take])
        del self._pending[:take]
        if header.masked:
            chunk = unmask(chunk, header.mask, cur.done)
        cur.done += take
        cur.remaining -= take
        if cur.opcode & 8:
            cur.control += chunk
        else:
            code = lib.lmw_message_payload(self._message, chunk, len(chunk))
            if code:
                raise ProtocolError(code)
            self._data += chunk
        if cur.remaining:
            return False
        self._current = None
        self._finish_frame(cur, out)
        return True

    def _finish_frame(self, cur: _Current, out: list[Message]) -> None:
        if cur.opcode & 8:
            if cur.opcode == OP_CLOSE:
                parse_close(bytes(cur.control))
            out.append(Message(cur.opcode, bytes(cur.control)))
            return
        opcode = self._message.opcode
        code = lib.lmw_message_frame_end(self._message, int(cur.fin))
        if code:
            raise ProtocolError(code)
        if cur.fin:
            out.append(Message(opcode, bytes(self._data)))
            self._data.clear()
