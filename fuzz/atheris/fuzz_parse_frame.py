"""atheris target: lmw_parse_frame, the lmw_message_* sequence and lmw_unmask.

A stream of frames is parsed the way the runtime does, and every step is compared with
a model written here from RFC 6455: the frame header fields (section 5.2) and its
refusals (reserved bits, unknown opcodes, fragmented or long control frames, unmasked
frames, a 64-bit length with the top bit set: 1002), fragmentation and the message cap
(1002, 1009), UTF-8 of text messages (1007), close payloads (section 5.5.1). Payloads
are unmasked in fuzzer-chosen pieces with the matching phase and must equal the XOR
computed here; rebuilt headers and close payloads must parse back to the same values.
"""

from __future__ import annotations

import struct
import sys
from itertools import pairwise

from _harness import native, run
from fuzz_utf8 import first_invalid

ffi, lib = native()

OPCODES = {0, 1, 2, 8, 9, 10}
MAX_MESSAGES = (0, 1, 125, 4096, 1 << 20, (1 << 64) - 1)


def model_header(buf: bytes, rsv_allowed: int, require_mask: bool) -> tuple[str, object]:
    """model_header returns ("error", None), ("incomplete", early_error) or ("ok", fields)."""
    early = False
    if buf:
        b0 = buf[0]
        rsv, opcode, fin = (b0 >> 4) & 7, b0 & 15, b0 >> 7
        early = bool(rsv & ~rsv_allowed) or opcode not in OPCODES or (opcode >= 8 and not fin)
    if len(buf) < 2:
        return "incomplete", early
    b1 = buf[1]
    masked, length = b1 >> 7, b1 & 127
    early = early or (require_mask and not masked) or (opcode >= 8 and length > 125)
    size = 2 + {126: 2, 127: 8}.get(length, 0) + 4 * masked
    if len(buf) < size:
        if length == 127 and len(buf) >= 3 and buf[2] & 0x80:
            early = True
        return "incomplete", early
    if early:
        return "error", None
    if length == 126:
        length = struct.unpack(">H", buf[2:4])[0]
    elif length == 127:
        length = struct.unpack(">Q", buf[2:10])[0]
        if length >> 63:
            return "error", None
    mask = buf[size - 4 : size] if masked else b"\0\0\0\0"
    return "ok", (fin, rsv, opcode, masked, length, size, mask)


def model_close(payload: bytes) -> tuple[int, int]:
    """model_close returns (result, code) of lmw_parse_close."""
    if not payload:
        return 0, 1005
    if len(payload) == 1:
        return 1002, 0
    code = struct.unpack(">H", payload[:2])[0]
    if not (1000 <= code <= 1003 or 1007 <= code <= 1011 or 3000 <= code <= 4999):
        return 1002, 0
    bad, truncated = first_invalid(payload[2:])
    return (1007, 0) if bad >= 0 or truncated else (0, code)


def check_header(buf: bytes, at: int, rsv_allowed: int, require_mask: bool):  # type: ignore[no-untyped-def]
    f = ffi.new("lmw_frame *")
    src = ffi.from_buffer(buf)
    rc = lib.lmw_parse_frame(src + at, len(buf) - at, rsv_allowed, int(require_mask), f)
    kind, info = model_header(buf[at:], rsv_allowed, require_mask)
    if kind == "ok":
        fin, rsv, opcode, masked, length, size, mask = info  # type: ignore[misc]
        assert rc == size == f.header_len, (rc, info)
        got = (f.fin, f.rsv, f.opcode, f.masked, f.payload_len)
        assert got == (fin, rsv, opcode, masked, length), (got, info)
        if masked:
            assert bytes(f.mask) == mask
    elif kind == "error":
        assert rc == lib.LMW_ERROR and f.close_code == 1002, (rc, buf[at:])
    else:
        assert rc == lib.LMW_INCOMPLETE or (info and rc == lib.LMW_ERROR), (rc, buf[at:])
        if rc == lib.LMW_ERROR:
            assert f.close_code == 1002
    return rc, f


def test_one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    flags, pieces = data[0], data[1]
    rsv_allowed, require_mask = flags & 7, bool(flags & 8)
    max_message = MAX_MESSAGES[(flags >> 4) % len(MAX_MESSAGES)]
    buf = bytearray(data[2:])
    m = ffi.new("lmw_message_state *")
    model_op, model_len, text = 0, 0, b""
    compressed = False  # RSV1 on the first frame: permessage-deflate, no UTF-8 check here
    at = 0
    while at < len(buf):
        rc, f = check_header(bytes(buf), at, rsv_allowed, require_mask)
        if rc < 0:
            return
        opcode, length = f.opcode, f.payload_len
        if f.rsv == 0 and f.payload_len < (1 << 63):
            out = ffi.new("uint8_t[10]")
            n = lib.lmw_build_header(out, f.fin, opcode, length)
            back = ffi.new("lmw_frame *")
            assert lib.lmw_parse_frame(out, n, 0, 0, back) == n
            assert (back.fin, back.opcode, back.payload_len) == (f.fin, opcode, length)
        code = lib.lmw_message_frame(m, f, max_message)
        want = 0
        if opcode < 8:
            if (opcode == 0) == (model_op == 0) or (opcode == 0 and f.rsv & 4):
                want = 1002  # RSV1 marks only a message's first frame (RFC 7692 6.1)
            else:
                if opcode:
                    model_op, model_len, text = opcode, 0, b""
                    compressed = bool(f.rsv & 4)
                if length > max_message - model_len:
                    want = 1009
                else:
                    model_len += length
        assert code == want, (code, want, opcode, length)
        if code:
            return
        at += rc
        avail = min(len(buf) - at, length)
        raw = bytes(buf[at : at + avail])
        cuts = sorted({0, avail, (pieces * 7919) % (avail + 1), (pieces * 31) % (avail + 1)})
        payload = ffi.from_buffer(buf)
        for a, b in pairwise(cuts):
            lib.lmw_unmask(payload + at + a, b - a, f.mask, a)
            assert bytes(buf[at + a : at + b]) == bytes(
                x ^ f.mask[(a + i) & 3] for i, x in enumerate(raw[a:b])
            )
            if opcode < 8:
                got = lib.lmw_message_payload(m, payload + at + a, b - a)
                if model_op == 1:
                    text += bytes(buf[at + a : at + b])
                bad = model_op == 1 and not compressed and first_invalid(text)[0] >= 0
                assert got == (1007 if bad else 0), (got, text)
                if got:
                    return
        if avail < length:
            return
        body = bytes(buf[at : at + avail])
        at += avail
        if opcode >= 8:
            if opcode == 8:
                result = ffi.new("uint16_t *")
                r = lib.lmw_parse_close(ffi.from_buffer(body), len(body), result)
                want_r, want_code = model_close(body)
                assert (r, result[0] if r == 0 else 0) == (want_r, want_code), (r, body)
                if r == 0 and len(body) >= 2:
                    again = ffi.new("uint8_t[125]")
                    n = lib.lmw_build_close_payload(again, result[0], body[2:], len(body) - 2)
                    assert bytes(ffi.buffer(again, n)) == body
            continue
        end = lib.lmw_message_frame_end(m, f.fin)
        if f.fin:
            truncated = model_op == 1 and not compressed and first_invalid(text)[1]
            assert end == (1007 if truncated else 0), (end, text)
            model_op, model_len, text = 0, 0, b""
            if end:
                return
        else:
            assert end == 0


if __name__ == "__main__":
    sys.exit(run(test_one_input))  # type: ignore[func-returns-value]
