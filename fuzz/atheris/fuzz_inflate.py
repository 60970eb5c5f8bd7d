"""atheris target: the runtime's permessage-deflate receive path, through a socketpair.

Each input drives one fresh lmw_server (auto-upgrade, compression on, 16 KiB messages, a
64 KiB spill budget) with one client that negotiated permessage-deflate. The input chooses a
message (text or binary), whether its payload is the input's bytes themselves (mostly not
deflate) or those bytes compressed by zlib (valid deflate, often a bomb past max_message),
a few corruptions, and how the payload is cut into fragments; the client sends it with RSV1
on the first frame.

Invariants (the outcome is "accepted" or one documented close code):
  * a MESSAGE event carries exactly what zlib's own inflater makes of the payload (and the
    0x00 0x00 0xff 0xff tail, RFC 7692 7.2.2), at most max_message bytes, valid UTF-8 when
    it is text;
  * otherwise the server's close frame says 1007 (not deflate, data past a final block, or
    invalid text), 1009 (more than max_message once inflated) or 1013 (spill budget); and
    when zlib's inflater refuses the payload, no message is ever delivered;
  * the spill bytes return to 0 and the pool holds at most one inflater.
"""

from __future__ import annotations

import socket
import struct
import zlib

from _harness import native, run

ffi, lib = native()
from lowmemws import Config  # noqa: E402  (after native(): the instrumented copy)
from lowmemws._c_server import c_config  # noqa: E402

MAX_MESSAGE = 16 * 1024
TAIL = b"\x00\x00\xff\xff"
UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
)
CONFIG = c_config(
    Config(max_message_size=MAX_MESSAGE, spill_budget=64 * 1024, read_buffer_size=8192),
    auto_upgrade=True,
)


def reference(payload: bytes) -> bytes | None:
    """reference is zlib's reading of a compressed message, or None when it is refused."""
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(payload + TAIL, MAX_MESSAGE + 1)
    except zlib.error:
        return None
    if d.eof and len(d.unused_data) > len(TAIL):
        return None  # data past a final block
    return out


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def frame(opcode: int, payload: bytes, fin: bool, rsv1: bool) -> bytes:
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0xFE, n)
    else:
        head = struct.pack("!BBQ", b0, 0xFF, n)
    return head + b"\x00\x00\x00\x00" + payload  # mask 0: the payload goes as it is


def message_from(data: bytes) -> tuple[int, bytes, list[bytes]]:
    """message_from decodes the input: opcode, payload, and its fragments."""
    flags = data[0]
    opcode = 1 if flags & 1 else 2
    body = data[2:]
    if flags & 2:  # valid deflate, possibly corrupted below
        level = zlib.compressobj(flags >> 4 & 7 or 1, zlib.DEFLATED, -15)
        times = 1 + (data[1] & 0x3F) * (64 if flags & 8 else 1)
        payload = level.compress(body * times) + level.flush(zlib.Z_SYNC_FLUSH)
        payload = payload[:-4] if flags & 4 else payload  # tail removed, or kept
        if data[1] & 0x40 and payload:
            at = data[1] % len(payload)
            payload = payload[:at] + bytes([payload[at] ^ 0x5A]) + payload[at + 1 :]
    else:
        payload = body
    cuts = sorted({b % (len(payload) + 1) for b in data[2:5]}) if data[1] & 0x80 else []
    parts, start = [], 0
    for cut in cuts:
        parts.append(payload[start:cut])
        start = cut
    parts.append(payload[start:])
    return opcode, payload, parts


def test_one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    opcode, payload, parts = message_from(data)
    server = lib.lmw_server_new(CONFIG, ffi.NULL)
    ours, theirs = socket.socketpair()
    try:
        theirs.setblocking(False)
        assert lib.lmw_adopt(server, theirs.fileno()) == 0
        theirs.detach()  # the server's now: lmw_server_free closes it
        ours.sendall(UPGRADE)
        events = ffi.new("lmw_event **")
        lib.lmw_poll(server, 0, events, 64)
        answer = ours.recv(4096)
        assert answer.startswith(b"HTTP/1.1 101") and b"permessage-deflate" in answer, answer
        wire = b"".join(
            frame(opcode if i == 0 else 0, part, i == len(parts) - 1, i == 0)
            for i, part in enumerate(parts)
        )
        ours.setblocking(False)
        delivered: list[tuple[int, bytes]] = []
        sent = 0
        for _ in range(64):
            if sent < len(wire):
                try:
                    sent += ours.send(wire[sent:])
                except BlockingIOError:
                    pass
            n = lib.lmw_poll(server, 0, events, 64)
            for i in range(n):
                e = events[0][i]
                if e.type == lib.LMW_EV_MESSAGE:
                    delivered.append((e.opcode, bytes(ffi.buffer(e.data, e.len))))
            if delivered or lib.lmw_connection_count(server) == 0:
                break
        stats = lib.lmw_server_stats(server)
        assert stats.deflate_streams <= 1
        expected = reference(payload)
        if delivered:
            ((got_opcode, got),) = delivered
            assert got_opcode == opcode
            assert expected is not None and got == expected, "differs from zlib"
            assert len(got) <= MAX_MESSAGE
            if opcode == 1:
                got.decode("utf-8")
        else:
            reply = b""
            try:
                reply = ours.recv(256)
            except BlockingIOError:
                pass
            if reply:  # a close frame: 0x88, length, code
                assert reply[0] == 0x88, reply
                code = struct.unpack("!H", reply[2:4])[0]
                assert code in (1007, 1009, 1013), code
                if expected is not None and len(expected) <= MAX_MESSAGE and code == 1007:
                    assert opcode == 1, "zlib accepted what the server called not deflate"
                    assert not is_utf8(expected), "valid text called invalid"
                if expected is None:
                    assert code != 1009 or len(payload) > MAX_MESSAGE or len(parts) > 0
    finally:
        ours.close()
        lib.lmw_server_free(server)


if __name__ == "__main__":
    run(test_one_input)
