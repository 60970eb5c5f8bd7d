"""atheris target: lmw_parse_request fed in chunks with its resume state, lmw_header_next.

The head is parsed once whole and once as a growing buffer (fuzzer-chosen chunk ends,
the lmw_request passed back unchanged after LMW_INCOMPLETE, as the runtime does).
Invariants: both give the same outcome; an error carries a documented status with a
prepared response; an accepted head ends with CRLF CRLF inside max_head, its spans lie
inside it, lmw_header_next yields exactly header_count trimmed fields whose names match
the known-header spans; an upgrade is a GET over HTTP/1.1 whose key decodes to 16 bytes
and whose Sec-WebSocket-Accept equals base64(SHA-1(key + GUID)) computed here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import sys

from _harness import native, run

ffi, lib = native()

DOCUMENTED = {400, 405, 426, 431, 501, 505}
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KNOWN = {
    b"host": lib.LMW_H_HOST,
    b"upgrade": lib.LMW_H_UPGRADE,
    b"connection": lib.LMW_H_CONNECTION,
    b"sec-websocket-key": lib.LMW_H_SEC_WEBSOCKET_KEY,
    b"sec-websocket-version": lib.LMW_H_SEC_WEBSOCKET_VERSION,
    b"sec-websocket-protocol": lib.LMW_H_SEC_WEBSOCKET_PROTOCOL,
    b"sec-websocket-extensions": lib.LMW_H_SEC_WEBSOCKET_EXTENSIONS,
    b"origin": lib.LMW_H_ORIGIN,
    b"cookie": lib.LMW_H_COOKIE,
    b"authorization": lib.LMW_H_AUTHORIZATION,
    b"content-length": lib.LMW_H_CONTENT_LENGTH,
    b"transfer-encoding": lib.LMW_H_TRANSFER_ENCODING,
}
SPANS = ("method", "target", "path", "query")
FIELDS = ("head_len", "status", "kind", "minor_version", "header_count", "present")


def outcome(req, rc: int) -> tuple[object, ...]:  # type: ignore[no-untyped-def]
    """outcome is what two parses of the same bytes must agree on (not `scanned`)."""
    if rc == lib.LMW_INCOMPLETE:
        return (rc,)
    if rc == lib.LMW_ERROR:
        return (rc, req.status)
    spans = [(getattr(req, n).off, getattr(req, n).len) for n in SPANS]
    spans += [(req.headers[i].off, req.headers[i].len) for i in range(lib.LMW_H_COUNT)]
    fields = [getattr(req, n) for n in FIELDS] + [req.content_length]
    return (rc, *fields, *spans)


def check_accepted(head: bytes, req, rc: int, max_head: int) -> None:  # type: ignore[no-untyped-def]
    assert 4 <= rc <= min(len(head), max_head) and head[rc - 4 : rc] == b"\r\n\r\n"
    assert req.head_len == rc
    assert req.kind in (lib.LMW_KIND_HTTP, lib.LMW_KIND_UPGRADE)
    for name in SPANS:
        span = getattr(req, name)
        assert span.off + span.len <= rc, name
    target = head[req.target.off : req.target.off + req.target.len]
    path = head[req.path.off : req.path.off + req.path.len]
    query = head[req.query.off : req.query.off + req.query.len]
    assert target == path + (b"?" + query if b"?" in target else b""), (target, path, query)
    seen: dict[int, list[bytes]] = {}
    pos = ffi.new("uint32_t *", 0)
    name_span = ffi.new("lmw_span *")
    value_span = ffi.new("lmw_span *")
    src = ffi.from_buffer(head)
    count = 0
    while lib.lmw_header_next(src, rc, pos, name_span, value_span):
        count += 1
        assert count <= req.header_count
        for span in (name_span, value_span):
            assert span.off + span.len <= rc
        name = head[name_span.off : name_span.off + name_span.len]
        value = head[value_span.off : value_span.off + value_span.len]
        assert name and b":" not in name and name.strip() == name, name
        assert value.strip(b" \t") == value, value
        index = KNOWN.get(name.lower())
        if index is not None:
            seen.setdefault(index, []).append(value)
    assert count == req.header_count, (count, req.header_count)
    for index in range(lib.LMW_H_COUNT):
        present = bool(req.present & (1 << index))
        assert present == (index in seen), (index, present, seen)
        if present:
            span = req.headers[index]
            assert span.off + span.len <= rc
            value = head[span.off : span.off + span.len]
            if len(seen[index]) == 1:
                assert value == seen[index][0], (index, value, seen[index])
    if req.kind == lib.LMW_KIND_UPGRADE:
        assert head[req.method.off : req.method.off + req.method.len] == b"GET"
        assert req.minor_version == 1
        span = req.headers[lib.LMW_H_SEC_WEBSOCKET_KEY]
        key = head[span.off : span.off + span.len]
        try:
            assert len(base64.b64decode(key, validate=True)) == 16, key
        except binascii.Error as exc:
            raise AssertionError(f"accepted key {key!r} is not base64") from exc
        out = ffi.new("uint8_t[28]")
        lib.lmw_accept_key(src + span.off, span.len, out)
        want = base64.b64encode(hashlib.sha1(key + GUID).digest())
        assert bytes(ffi.buffer(out, 28)) == want, key
        resp = ffi.new("uint8_t[512]")
        n = lib.lmw_build_101(src + span.off, span.len, ffi.NULL, 0, 0, resp, 512)
        assert n > 0 and want in bytes(ffi.buffer(resp, n))


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    max_head = 16 + data[0] * 40
    ncut = data[1] % 8
    control, head = data[2 : 2 + ncut], data[2 + ncut :]
    src = ffi.from_buffer(head) if head else ffi.new("uint8_t[1]")
    whole = ffi.new("lmw_request *")
    rc_whole = lib.lmw_parse_request(src, len(head), max_head, whole)
    ends = sorted({b * len(head) // 255 for b in control} | {len(head)})
    req = ffi.new("lmw_request *")
    rc = lib.LMW_INCOMPLETE
    for end in ends:
        rc = lib.lmw_parse_request(src, end, max_head, req)
        if rc != lib.LMW_INCOMPLETE:
            break
        assert end < max_head, (end, max_head)
    if rc == lib.LMW_ERROR:
        assert req.status in DOCUMENTED, req.status
        size = ffi.new("size_t *")
        assert lib.lmw_reject_response(req.status, size) != ffi.NULL and size[0] > 0
    assert outcome(req, rc) == outcome(whole, rc_whole), (rc, rc_whole, head)
    if rc > 0:
        check_accepted(head, req, rc, max_head)


if __name__ == "__main__":
    sys.exit(run(test_one_input))  # type: ignore[func-returns-value]
