"""Specification of the request-head parser and the opening handshake (C codec).

RFC 7230 section 3 (message format), RFC 6455 sections 1.3 and 4.2 (opening handshake).
wsproto is the independent reference peer.
"""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.utilities import RemoteProtocolError

from lowmemws._native import ffi, lib
from lowmemws.codec import (
    KIND_HTTP,
    KIND_UPGRADE,
    RequestParser,
    accept_key,
    build_101,
    parse_request,
    reject_response,
)
from lowmemws.errors import HandshakeError
from tests.support.guarded_page import GuardedPage
from tests.support.http_samples import BROWSER_REQUEST

# RFC 6455 section 1.2, the sample client handshake.
RFC_REQUEST = (
    b"GET /chat HTTP/1.1\r\n"
    b"Host: server.example.com\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Origin: http://example.com\r\n"
    b"Sec-WebSocket-Protocol: chat, superchat\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)

# What a current browser sends, cookies included (~600 bytes).

PLAIN_GET = b"GET /health HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"


def upgrade_with(**changes: bytes | None) -> bytes:
    """upgrade_with returns RFC_REQUEST with headers replaced (None removes one)."""
    lines = RFC_REQUEST.split(b"\r\n")[:-2]
    out = [lines[0]]
    for line in lines[1:]:
        name = line.split(b":")[0].decode().lower().replace("-", "_")
        if name in changes:
            value = changes.pop(name)
            if value is not None:
                out.append(line.split(b":")[0] + b": " + value)
        else:
            out.append(line)
    for name, value in changes.items():
        assert value is not None
        out.append(name.replace("_", "-").encode() + b": " + value)
    return b"\r\n".join(out) + b"\r\n\r\n"


def status_of(data: bytes, max_head: int = 8192) -> int:
    """status_of returns 0 for an accepted head, -2 for incomplete, else the HTTP status."""
    try:
        return 0 if parse_request(data, max_head) is not None else -2
    except HandshakeError as exc:
        return exc.status


# ---------------------------------------------------------------------------------------
# Accepted heads
# ---------------------------------------------------------------------------------------


def test_rfc6455_sample_request_is_an_upgrade_with_zero_copy_spans() -> None:
    req = parse_request(RFC_REQUEST)
    assert req is not None
    assert req.kind == KIND_UPGRADE and req.is_upgrade
    assert req.head_len == len(RFC_REQUEST)
    assert (req.method, req.target, req.path, req.query) == (b"GET", b"/chat", b"/chat", b"")
    assert req.minor_version == 1
    assert req.known[b"host"] == b"server.example.com"
    assert req.known[b"sec-websocket-key"] == b"dGhlIHNhbXBsZSBub25jZQ=="
    assert req.known[b"sec-websocket-protocol"] == b"chat, superchat"
    assert req.known[b"origin"] == b"http://example.com"
    assert len(req.headers) == 7


def test_browser_request_with_cookies() -> None:
    req = parse_request(BROWSER_REQUEST)
    assert req is not None and req.is_upgrade
    assert 550 <= len(BROWSER_REQUEST) <= 700
    assert req.path == b"/notify" and req.query == b"user=42&v=3"
    assert req.known[b"cookie"].startswith(b"session=3f2a") and req.known[b"cookie"].endswith(
        b"Lk1"
    )
    assert req.known[b"connection"] == b"keep-alive, Upgrade"
    assert req.known[b"sec-websocket-extensions"] == (b"permessage-deflate; client_max_window_bits")
    assert (
        req.header(
            b"user-agent",
        )
        is not None
    )
    assert [name for name, _ in req.headers][:3] == [b"Host", b"Connection", b"Pragma"]


def test_spans_point_into_the_callers_buffer() -> None:
    req = ffi.new("lmw_request *")
    assert lib.lmw_parse_request(RFC_REQUEST, len(RFC_REQUEST), 8192, req) == len(RFC_REQUEST)
    key = req.headers[lib.LMW_H_SEC_WEBSOCKET_KEY]
    assert RFC_REQUEST[key.off : key.off + key.len] == b"dGhlIHNhbXBsZSBub25jZQ=="
    assert req.present & (1 << lib.LMW_H_ORIGIN)
    assert not req.present & (1 << lib.LMW_H_COOKIE)
    assert req.header_count == 7


def test_plain_http_request_goes_to_the_http_hook() -> None:
    req = parse_request(PLAIN_GET)
    assert req is not None and req.kind == KIND_HTTP and not req.is_upgrade
    assert req.path == b"/health"


@pytest.mark.parametrize("upgrade", [b"h2c", b"websocketx", b"web socket", b"", b"websocket/13"])
def test_upgrade_to_something_else_is_plain_http(upgrade: bytes) -> None:
    req = parse_request(upgrade_with(upgrade=upgrade, sec_websocket_version=None))
    assert req is not None and req.kind == KIND_HTTP


def test_http10_without_host_is_plain_http() -> None:
    req = parse_request(b"GET / HTTP/1.0\r\n\r\n")
    assert req is not None and req.kind == KIND_HTTP and req.minor_version == 0


def test_post_with_content_length_is_plain_http() -> None:
    head = b"POST /publish HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n"
    req = parse_request(head + b"hello world")
    assert req is not None and req.head_len == len(head) and req.content_length == 11


def test_names_are_case_insensitive_and_values_trimmed() -> None:
    head = (
        b"GET / HTTP/1.1\r\nhOsT:\t example.org \t\r\nUPGRADE:WebSocket\r\n"
        b"connection: keep-alive ,  UPGRADE\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"SEC-WEBSOCKET-VERSION:13\r\nX-Empty:\r\n\r\n"
    )
    req = parse_request(head)
    assert req is not None and req.is_upgrade
    assert req.known[b"host"] == b"example.org"
    assert (b"X-Empty", b"") in req.headers


def test_upgrade_token_found_in_any_upgrade_or_connection_header() -> None:
    head = upgrade_with(connection=b"keep-alive").replace(
        b"\r\n\r\n", b"\r\nConnection: Upgrade\r\n\r\n"
    )
    req = parse_request(head)
    assert req is not None and req.is_upgrade
    assert req.known[b"connection"] == b"keep-alive"  # the first occurrence


def test_head_exactly_max_head_bytes_is_accepted() -> None:
    assert status_of(RFC_REQUEST, max_head=len(RFC_REQUEST)) == 0
    assert status_of(RFC_REQUEST, max_head=len(RFC_REQUEST) - 1) == 431


def test_bytes_after_the_head_are_not_part_of_it() -> None:
    req = parse_request(RFC_REQUEST + b"\x81\x85garbage")
    assert req is not None and req.head_len == len(RFC_REQUEST)


# ---------------------------------------------------------------------------------------
# Refused heads: every status
# ---------------------------------------------------------------------------------------

REFUSED = [
    ("bare LF line endings", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("bare LF inside the head", b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),
    ("LF LF at the end", b"GET / HTTP/1.1\r\nHost: a\r\n\n", 400),
    ("empty line before the request line", b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("empty head", b"\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    ("obs-fold with tab", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tc\r\n\r\n", 400),
    ("whitespace before colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    ("no colon", b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", 400),
    ("empty name", b"GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n", 400),
    ("separator in name", b"GET / HTTP/1.1\r\nHost: a\r\nX(y): b\r\n\r\n", 400),
    ("control byte in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: b\x01c\r\n\r\n", 400),
    ("NUL in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: abcdefgh\x00ijk\r\n\r\n", 400),
    ("bare CR in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: b\rc\r\n\r\n", 400),
    ("DEL in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: b\x7fc\r\n\r\n", 400),
    ("two spaces in request line", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("tab in request line", b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("no target", b"GET HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("non-ASCII target", b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("lowercase version", b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    ("version with trailing junk", b"GET / HTTP/1.10\r\nHost: a\r\n\r\n", 400),
    ("missing version", b"GET /\r\nHost: a\r\n\r\n", 400),
    ("missing Host in HTTP/1.1", b"GET / HTTP/1.1\r\nX: a\r\n\r\n", 400),
    ("duplicate Host", b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", 400),
    (
        "duplicate Content-Length",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        400,
    ),
    (
        "Content-Length not a number",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
        400,
    ),
    ("Content-Length list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n", 400),
    ("Content-Length negative", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    ("Content-Length empty", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n", 400),
    (
        "Content-Length overflow",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
        400,
    ),
    (
        "duplicate Sec-WebSocket-Key",
        upgrade_with().replace(
            b"\r\n\r\n", b"\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ),
        400,
    ),
    (
        "duplicate Sec-WebSocket-Version",
        upgrade_with().replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Version: 13\r\n\r\n"),
        400,
    ),
    ("missing key", upgrade_with(sec_websocket_key=None), 400),
    ("key of 15 bytes", upgrade_with(sec_websocket_key=base64.b64encode(b"x" * 15)), 400),
    ("key of 17 bytes", upgrade_with(sec_websocket_key=base64.b64encode(b"x" * 17)), 400),
    ("key not base64", upgrade_with(sec_websocket_key=b"dGhlIHNhbXBsZSBub25jZQ!="), 400),
    ("key without padding", upgrade_with(sec_websocket_key=b"dGhlIHNhbXBsZSBub25jZQ"), 400),
    ("key empty", upgrade_with(sec_websocket_key=b""), 400),
    ("Connection without upgrade", upgrade_with(connection=b"keep-alive"), 400),
    ("no Connection", upgrade_with(connection=None), 400),
    ("Connection token inside a word", upgrade_with(connection=b"upgrades"), 400),
    ("upgrade with POST", upgrade_with().replace(b"GET", b"POST", 1), 405),
    ("upgrade with HEAD", upgrade_with().replace(b"GET", b"HEAD", 1), 405),
    ("upgrade with HTTP/1.0", upgrade_with().replace(b"HTTP/1.1", b"HTTP/1.0", 1), 505),
    ("missing version header", upgrade_with(sec_websocket_version=None), 426),
    ("version 8", upgrade_with(sec_websocket_version=b"8"), 426),
    ("version list", upgrade_with(sec_websocket_version=b"13, 8"), 426),
    ("Transfer-Encoding", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
    ("HTTP/0.9", b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505),
]


@pytest.mark.parametrize(
    ("data", "status"), [(d, s) for _, d, s in REFUSED], ids=[n for n, _, _ in REFUSED]
)
def test_refused_heads_carry_the_status_the_client_gets(data: bytes, status: int) -> None:
    with pytest.raises(HandshakeError) as info:
        parse_request(data)
    assert info.value.status == status
    assert reject_response(status) is not None


def test_431_when_the_cap_is_reached_without_a_complete_head() -> None:
    big = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + b"c" * 9000
    assert status_of(big[:8191]) == -2
    assert status_of(big[:8192]) == 431
    assert status_of(big + b"\r\n\r\n") == 431
    assert status_of(big[:100], max_head=100) == 431


def test_a_bare_lf_fails_before_the_head_is_complete() -> None:
    assert status_of(b"GET / HTTP/1.1\n") == 400


# ---------------------------------------------------------------------------------------
# Incremental input: whole, byte by byte, split at every offset, never rescanned
# ---------------------------------------------------------------------------------------

SAMPLES = [RFC_REQUEST, BROWSER_REQUEST, PLAIN_GET] + [d for _, d, _ in REFUSED]


def outcome(parser: RequestParser, pieces: list[bytes]) -> object:
    try:
        for piece in pieces:
            req = parser.feed(piece)
            if req is not None:
                return req
        return None
    except HandshakeError as exc:
        return exc.status


@pytest.mark.parametrize("data", SAMPLES)
def test_byte_by_byte_and_every_split_give_the_whole_result(data: bytes) -> None:
    whole = outcome(RequestParser(), [data])
    assert outcome(RequestParser(), [data[i : i + 1] for i in range(len(data))]) == whole
    for cut in range(len(data) + 1):
        assert outcome(RequestParser(), [data[:cut], data[cut:]]) == whole


def test_a_slow_client_is_never_rescanned() -> None:
    parser = RequestParser()
    for i, byte in enumerate(BROWSER_REQUEST[:-1]):
        assert parser.feed(bytes([byte])) is None
        assert parser.scanned == i + 1  # the search covered each byte exactly once
    assert parser.feed(BROWSER_REQUEST[-1:]) is not None


def test_every_prefix_is_incomplete() -> None:
    for cut in range(len(BROWSER_REQUEST)):
        assert status_of(BROWSER_REQUEST[:cut]) == -2


# ---------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
names = st.text(alphabet=TCHARS, min_size=1, max_size=20).map(str.encode)
values = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c in (9, 32) or 0x21 <= c <= 0x7E or c >= 0x80)
)
RESERVED = {h.decode() for h in (b"host", b"content-length", b"transfer-encoding")}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(names, values), max_size=12))
def test_any_wellformed_head_lists_every_header_trimmed(
    fields: list[tuple[bytes, bytes]],
) -> None:
    fields = [(n, v) for n, v in fields if n.decode().lower() not in RESERVED]
    head = b"GET /x HTTP/1.1\r\nHost: h\r\n"
    head += b"".join(n + b":" + v + b"\r\n" for n, v in fields) + b"\r\n"
    try:
        req = parse_request(head)
    except HandshakeError as exc:  # only the handshake rules may refuse a well-formed head
        assert exc.status in (400, 405, 426, 505)
        assert any(n.lower() == b"upgrade" for n, _ in fields) or any(
            n.lower().startswith(b"sec-websocket") for n, _ in fields
        )
        return
    assert req is not None
    assert req.headers[1:] == [(n, v.strip(b" \t")) for n, v in fields]


DOCUMENTED = {400, 405, 426, 431, 501, 505}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 400))
def test_any_bytes_are_accepted_incomplete_or_a_documented_status(
    data: bytes, max_head: int
) -> None:
    result = status_of(data, max_head)
    assert result in {0, -2} | DOCUMENTED
    if result == 0:
        req = parse_request(data, max_head)
        assert req is not None and req.head_len <= min(len(data), max_head)
        assert data[req.head_len - 4 : req.head_len] == b"\r\n\r\n"


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(BROWSER_REQUEST) - 1), st.integers(0, 255))
def test_one_changed_byte_gives_a_documented_outcome(at: int, byte: int) -> None:
    data = bytearray(BROWSER_REQUEST)
    data[at] = byte
    assert status_of(bytes(data)) in {0, -2} | DOCUMENTED


# ---------------------------------------------------------------------------------------
# Token lists, header iteration
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "token", "found"),
    [
        (b"Upgrade", b"upgrade", True),
        (b"keep-alive, Upgrade", b"upgrade", True),
        (b"keep-alive,Upgrade ", b"upgrade", True),
        (b" , ,UPGRADE,,", b"upgrade", True),
        (b"upgrades", b"upgrade", False),
        (b"up grade", b"upgrade", False),
        (b"", b"upgrade", False),
        (b"chat, superchat", b"superchat", True),
        (b"chat, superchat", b"super", False),
    ],
)
def test_token_lists(tokens: bytes, token: bytes, found: bool) -> None:
    assert bool(lib.lmw_token_list_has(tokens, len(tokens), token, len(token))) is found


def test_header_iteration_sees_every_field_once() -> None:
    pos = ffi.new("uint32_t *", 0)
    name, value = ffi.new("lmw_span *"), ffi.new("lmw_span *")
    seen = []
    while lib.lmw_header_next(RFC_REQUEST, len(RFC_REQUEST), pos, name, value):
        seen.append(RFC_REQUEST[name.off : name.off + name.len])
    assert seen == [line.split(b":")[0] for line in RFC_REQUEST.split(b"\r\n")[1:-2]]


# ---------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------


def test_rfc6455_section_1_3_accept_key() -> None:
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@given(st.binary(min_size=16, max_size=16))
def test_accept_key_is_base64_sha1_of_key_and_guid(raw: bytes) -> None:
    import hashlib

    key = base64.b64encode(raw)
    guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    assert accept_key(key) == base64.b64encode(hashlib.sha1(key + guid).digest())


@given(st.binary(max_size=200))
def test_accept_key_of_any_length_matches_hashlib(key: bytes) -> None:
    import hashlib

    guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    assert accept_key(key) == base64.b64encode(hashlib.sha1(key + guid).digest())


def test_101_response() -> None:
    resp = build_101(b"dGhlIHNhbXBsZSBub25jZQ==", b"chat")
    assert resp.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in resp
    assert b"\r\nSec-WebSocket-Protocol: chat\r\n" in resp
    assert b"Sec-WebSocket-Protocol" not in build_101(b"dGhlIHNhbXBsZSBub25jZQ==")
    assert resp.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("bad", [b"chat\r\nX-Injected: 1", b"a b", b"a,b"])
def test_101_refuses_a_protocol_that_is_not_a_token(bad: bytes) -> None:
    with pytest.raises(ValueError):
        build_101(b"dGhlIHNhbXBsZSBub25jZQ==", bad)


def test_101_needs_enough_room() -> None:
    out = ffi.new("uint8_t[100]")
    assert lib.lmw_build_101(b"k" * 24, 24, b"", 0, 0, out, 100) == lib.LMW_ERROR


@pytest.mark.parametrize(
    "status", [400, 401, 403, 404, 405, 408, 413, 426, 429, 431, 500, 501, 503, 505]
)
def test_reject_responses_are_complete_http_responses(status: int) -> None:
    resp = reject_response(status)
    assert resp is not None
    head, body = resp.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert re.fullmatch(rb"HTTP/1\.1 %d [A-Za-z ]+" % status, lines[0])
    fields = {k.lower(): v for k, v in (line.split(b": ", 1) for line in lines[1:])}
    assert int(fields[b"content-length"]) == len(body) > 0
    assert b"close" in fields[b"connection"].split(b", ")
    if status == 426:
        assert fields[b"sec-websocket-version"] == b"13"
    if status in (429, 503):
        assert fields[b"retry-after"] == b"1"


def test_no_reject_response_for_other_statuses() -> None:
    assert reject_response(200) is None
    assert reject_response(999) is None


# ---------------------------------------------------------------------------------------
# wsproto as the reference peer
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("subprotocols", [[], ["chat"], ["chat", "superchat"]])
def test_wsproto_client_handshake_round_trip(subprotocols: list[str]) -> None:
    client = WSConnection(ConnectionType.CLIENT)
    wire = client.send(
        Request(host="example.com", target="/chat?room=1", subprotocols=subprotocols)
    )
    req = parse_request(wire)
    assert req is not None and req.is_upgrade
    assert (req.path, req.query, req.known[b"host"]) == (b"/chat", b"room=1", b"example.com")
    chosen = subprotocols[0].encode() if subprotocols else b""
    client.receive_data(build_101(req.known[b"sec-websocket-key"], chosen))
    events = list(client.events())
    assert len(events) == 1 and isinstance(events[0], AcceptConnection)
    assert events[0].subprotocol == (subprotocols[0] if subprotocols else None)


def test_wsproto_client_rejects_a_wrong_accept_key() -> None:
    client = WSConnection(ConnectionType.CLIENT)
    client.send(Request(host="example.com", target="/"))
    with pytest.raises(RemoteProtocolError, match="accept token"):
        client.receive_data(build_101(b"AAAAAAAAAAAAAAAAAAAAAA=="))


# ---------------------------------------------------------------------------------------
# No over-read: input placed right before a PROT_NONE page
# ---------------------------------------------------------------------------------------


def test_request_parser_never_reads_past_the_input(guarded_page: GuardedPage) -> None:
    for sample in (BROWSER_REQUEST, RFC_REQUEST, b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r"):
        for cut in range(len(sample) + 1):
            req = ffi.new("lmw_request *")
            rc = lib.lmw_parse_request(guarded_page.place(sample[:cut]), cut, 8192, req)
            assert rc in (lib.LMW_INCOMPLETE, lib.LMW_ERROR, len(sample))
        pos = ffi.new("uint32_t *", 0)
        name, value = ffi.new("lmw_span *"), ffi.new("lmw_span *")
        ptr = guarded_page.place(sample)
        while lib.lmw_header_next(ptr, len(sample), pos, name, value):
            pass
