"""Specification of the frame codec (RFC 6455 sections 5 and 7), wsproto as the reference."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

from lowmemws._native import ffi, lib
from lowmemws.codec import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    Message,
    build_101,
    build_close,
    build_frame,
    close_code_valid,
    parse_close,
    parse_frame,
    parse_frame_header,
    parse_request,
    unmask,
)
from lowmemws.errors import ProtocolError
from tests.support.guarded_page import GuardedPage

MASK = bytes.fromhex("37fa213d")

# ---------------------------------------------------------------------------------------
# RFC 6455 section 5.7 examples
# ---------------------------------------------------------------------------------------

HELLO_UNMASKED = bytes.fromhex("810548656c6c6f")
HELLO_MASKED = bytes.fromhex("818537fa213d7f9f4d5158")
HELLO_FRAGMENTED = bytes.fromhex("010348656c") + bytes.fromhex("80026c6f")
PING_UNMASKED = bytes.fromhex("890548656c6c6f")
PONG_MASKED = bytes.fromhex("8a8537fa213d7f9f4d5158")


def test_rfc_5_7_single_frame_unmasked_text() -> None:
    frame = parse_frame(HELLO_UNMASKED, require_mask=False)
    assert frame is not None and frame.payload == b"Hello"
    h = frame.header
    assert (h.fin, h.opcode, h.masked, h.header_len, h.payload_len) == (True, 1, False, 2, 5)
    assert build_frame(OP_TEXT, b"Hello") == HELLO_UNMASKED


def test_rfc_5_7_single_frame_masked_text() -> None:
    frame = parse_frame(HELLO_MASKED)
    assert frame is not None and frame.payload == b"Hello"
    assert frame.header.mask == MASK and frame.header.header_len == 6
    assert build_frame(OP_TEXT, b"Hello", mask=MASK) == HELLO_MASKED


def test_rfc_5_7_fragmented_unmasked_text() -> None:
    reader = FrameReader(require_mask=False)
    assert reader.feed(HELLO_FRAGMENTED) == [Message(OP_TEXT, b"Hello")]
    assert (
        build_frame(OP_TEXT, b"Hel", fin=False) + build_frame(OP_CONTINUATION, b"lo")
        == HELLO_FRAGMENTED
    )


def test_rfc_5_7_ping_and_masked_pong() -> None:
    assert FrameReader(require_mask=False).feed(PING_UNMASKED) == [Message(OP_PING, b"Hello")]
    assert FrameReader().feed(PONG_MASKED) == [Message(OP_PONG, b"Hello")]
    assert build_frame(OP_PING, b"Hello") == PING_UNMASKED


def test_rfc_5_7_binary_256_bytes_and_64_kib_lengths() -> None:
    assert build_frame(OP_BINARY, bytes(256))[:4] == bytes.fromhex("827e0100")
    assert build_frame(OP_BINARY, bytes(65536))[:10] == bytes.fromhex("827f0000000000010000")
    header = parse_frame_header(bytes.fromhex("827f0000000000010000"), require_mask=False)
    assert header is not None and header.payload_len == 65536 and header.header_len == 10


@pytest.mark.parametrize(
    ("length", "header_len"),
    [(0, 2), (1, 2), (125, 2), (126, 4), (127, 4), (65535, 4), (65536, 10), (70000, 10)],
)
def test_server_headers_use_the_shortest_length(length: int, header_len: int) -> None:
    out = ffi.new("uint8_t[10]")
    assert lib.lmw_build_header(out, 1, OP_BINARY, length) == header_len
    header = parse_frame_header(bytes(ffi.buffer(out, header_len)), require_mask=False)
    assert header is not None and header.payload_len == length


# ---------------------------------------------------------------------------------------
# Header errors (1002) and incomplete headers
# ---------------------------------------------------------------------------------------

BAD_HEADERS = [
    ("RSV1 without extension", "c180"),
    ("RSV2", "a180"),
    ("RSV3", "9180"),
    *[
        (f"reserved opcode {op}", f"{0x80 | op:02x}80")
        for op in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15)
    ],
    ("fragmented ping", "0980"),
    ("fragmented close", "0880"),
    ("ping of 126 bytes", "89fe007e"),
    ("close with 64-bit length", "88ff0000000000000001"),
    ("unmasked client frame", "8100"),
    ("64-bit length with top bit", "82ff8000000000000000"),
]


@pytest.mark.parametrize("hexdata", [h for _, h in BAD_HEADERS], ids=[n for n, _ in BAD_HEADERS])
def test_forbidden_headers_close_with_1002(hexdata: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_frame_header(bytes.fromhex(hexdata) + bytes(16))
    assert info.value.close_code == 1002


def test_allowed_reserved_bits_pass() -> None:
    header = parse_frame_header(bytes.fromhex("c18000000000"), rsv_allowed=4)
    assert header is not None and header.rsv == 4


def test_a_control_frame_of_125_bytes_is_fine() -> None:
    frame = build_frame(OP_PING, b"p" * 125, mask=MASK)
    assert FrameReader().feed(frame) == [Message(OP_PING, b"p" * 125)]


@pytest.mark.parametrize("length", [0, 125, 126, 65536])
def test_every_prefix_of_a_header_is_incomplete(length: int) -> None:
    frame = build_frame(OP_BINARY, bytes(length), mask=MASK)
    header = parse_frame_header(frame)
    assert header is not None
    for cut in range(header.header_len):
        assert parse_frame_header(frame[:cut]) is None
    assert parse_frame(frame[:-1]) is None if length else True


# ---------------------------------------------------------------------------------------
# Messages: fragmentation, size, UTF-8, close payloads
# ---------------------------------------------------------------------------------------


def client(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return build_frame(opcode, payload, fin=fin, mask=MASK)


def close_code_of(data: bytes, max_message: int = 1 << 20) -> int:
    with pytest.raises(ProtocolError) as info:
        FrameReader(max_message).feed(data)
    return info.value.close_code


def test_control_frames_may_interleave_a_fragmented_message() -> None:
    stream = (
        client(OP_TEXT, b"Hel", fin=False)
        + client(OP_PING, b"?")
        + client(OP_CONTINUATION, b"lo", fin=False)
        + client(OP_PONG, b"")
        + client(OP_CONTINUATION, b"!")
    )
    assert FrameReader().feed(stream) == [
        Message(OP_PING, b"?"),
        Message(OP_PONG, b""),
        Message(OP_TEXT, b"Hello!"),
    ]


def test_continuation_without_a_message_is_1002() -> None:
    assert close_code_of(client(OP_CONTINUATION, b"x")) == 1002


def test_new_message_inside_a_fragmented_one_is_1002() -> None:
    assert close_code_of(client(OP_TEXT, b"a", fin=False) + client(OP_BINARY, b"b")) == 1002


def test_message_over_max_message_is_1009_at_the_header() -> None:
    assert FrameReader(10).feed(client(OP_BINARY, bytes(10))) == [Message(OP_BINARY, bytes(10))]
    assert close_code_of(client(OP_BINARY, bytes(11)), max_message=10) == 1009
    reader = FrameReader(10)
    reader.feed(client(OP_BINARY, bytes(6), fin=False))
    with pytest.raises(ProtocolError) as info:
        reader.feed(client(OP_CONTINUATION, bytes(5))[:6])  # only the header arrived
    assert info.value.close_code == 1009


def test_invalid_text_fails_at_the_first_bad_byte_before_the_frame_ends() -> None:
    frame = client(OP_TEXT, b"ok \xc0\xaf" + b"x" * 100)
    reader = FrameReader()
    assert reader.feed(frame[: 6 + 3]) == []
    with pytest.raises(ProtocolError) as info:
        reader.feed(frame[9:10])
    assert info.value.close_code == 1007


def test_a_character_may_be_split_across_fragments() -> None:
    euro = "€".encode()
    stream = client(OP_TEXT, euro[:1], fin=False) + client(OP_CONTINUATION, euro[1:])
    assert FrameReader().feed(stream) == [Message(OP_TEXT, euro)]


def test_text_ending_inside_a_character_is_1007() -> None:
    assert close_code_of(client(OP_TEXT, "€".encode()[:2])) == 1007


def test_binary_messages_are_not_checked_as_utf8() -> None:
    assert FrameReader().feed(client(OP_BINARY, b"\xff\xfe")) == [Message(OP_BINARY, b"\xff\xfe")]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x03", 1002),
        (b"\x03\xe7", 999),
        (b"\x03\xec", 1004),
        (b"\x03\xed", 1005),
        (b"\x03\xee", 1006),
        (b"\x03\xf7", 1015),
        (b"\x0b\xb7", 2999),
        (b"\x13\x88", 5000),
    ],
)
def test_invalid_close_payloads_are_1002(payload: bytes, code: int) -> None:
    assert close_code_of(client(OP_CLOSE, payload)) == 1002


def test_close_reason_that_is_not_utf8_is_1007() -> None:
    assert close_code_of(client(OP_CLOSE, b"\x03\xe8bad \xff")) == 1007


def test_empty_close_payload_means_1005() -> None:
    assert parse_close(b"") == (1005, "")


VALID_CODES = [*range(1000, 1004), *range(1007, 1012), 3000, 3999, 4000, 4999]
INVALID_CODES = [0, 999, 1004, 1005, 1006, 1012, 1015, 1016, 2000, 2999, 5000, 65535]


@pytest.mark.parametrize("code", VALID_CODES)
def test_valid_close_codes_round_trip(code: int) -> None:
    assert close_code_valid(code)
    frame = build_close(code, "bye ✓")
    parsed = parse_frame(frame, require_mask=False)
    assert parsed is not None and parse_close(parsed.payload) == (code, "bye ✓")


@pytest.mark.parametrize("code", INVALID_CODES)
def test_invalid_close_codes_are_never_sent(code: int) -> None:
    assert not close_code_valid(code)
    with pytest.raises(ValueError):
        build_close(code)


def test_close_reason_is_at_most_123_bytes() -> None:
    assert len(build_close(1000, "r" * 123)) == 2 + 125
    with pytest.raises(ValueError):
        build_close(1000, "r" * 124)
    out = ffi.new("uint8_t[125]")
    assert lib.lmw_build_close_payload(out, 1000, b"\xc3", 1) == lib.LMW_ERROR


# ---------------------------------------------------------------------------------------
# Streams: whole, byte by byte, every split
# ---------------------------------------------------------------------------------------

STREAM = (
    client(OP_TEXT, "héllo".encode())
    + client(OP_BINARY, bytes(range(256)) * 2)
    + client(OP_TEXT, b"frag", fin=False)
    + client(OP_PING, b"p")
    + client(OP_CONTINUATION, "mented €".encode())
    + client(OP_BINARY, b"")
    + client(OP_CLOSE, b"\x03\xe8done")
)
STREAM_MESSAGES = [
    Message(OP_TEXT, "héllo".encode()),
    Message(OP_BINARY, bytes(range(256)) * 2),
    Message(OP_PING, b"p"),
    Message(OP_TEXT, "fragmented €".encode()),
    Message(OP_BINARY, b""),
    Message(OP_CLOSE, b"\x03\xe8done"),
]


def test_stream_whole_byte_by_byte_and_split_everywhere() -> None:
    assert FrameReader().feed(STREAM) == STREAM_MESSAGES
    reader = FrameReader()
    assert [m for i in range(len(STREAM)) for m in reader.feed(STREAM[i : i + 1])] == (
        STREAM_MESSAGES
    )
    for cut in range(len(STREAM) + 1):
        reader = FrameReader()
        assert reader.feed(STREAM[:cut]) + reader.feed(STREAM[cut:]) == STREAM_MESSAGES


def test_only_an_incomplete_header_is_kept_pending() -> None:
    reader = FrameReader()
    frame = client(OP_BINARY, bytes(1000))
    reader.feed(frame[:3])
    assert reader.pending == 3  # 126-length header needs 8 bytes; nothing consumed yet
    reader.feed(frame[3:500])
    assert reader.pending == 0  # payload bytes are handed on as they arrive


# ---------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.booleans(),
    st.sampled_from([OP_CONTINUATION, OP_TEXT, OP_BINARY]),
    st.one_of(st.integers(0, 70000), st.integers(0, 2**63 - 1)),
)
def test_parse_of_build_is_identity(fin: bool, opcode: int, length: int) -> None:
    out = ffi.new("uint8_t[10]")
    n = lib.lmw_build_header(out, int(fin), opcode, length)
    header = parse_frame_header(bytes(ffi.buffer(out, n)), require_mask=False)
    assert header is not None
    assert (header.fin, header.opcode, header.payload_len, header.header_len) == (
        fin,
        opcode,
        length,
        n,
    )


def xor_reference(data: bytes, mask: bytes, phase: int) -> bytes:
    return bytes(b ^ mask[(phase + i) % 4] for i, b in enumerate(data))


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300),
    st.binary(min_size=4, max_size=4),
    st.integers(0, 7),
    st.lists(st.integers(0, 300), max_size=5),
    st.integers(0, 7),
)
def test_unmask_in_pieces_at_any_phase_and_alignment(
    data: bytes, mask: bytes, phase: int, cuts: list[int], misalign: int
) -> None:
    assert unmask(data, mask, phase) == xor_reference(data, mask, phase)
    buf = bytearray(misalign) + bytearray(data)
    ptr = ffi.from_buffer(buf) + misalign
    edges = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for a, b in zip(edges, edges[1:], strict=False):
        lib.lmw_unmask(ptr + a, b - a, mask, phase + a)
    assert bytes(buf[misalign:]) == xor_reference(data, mask, phase)
    assert unmask(unmask(data, mask, phase), mask, phase) == data


frames_strategy = st.lists(
    st.tuples(st.sampled_from([OP_TEXT, OP_BINARY, OP_PING]), st.text(max_size=200)),
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(frames_strategy, st.binary(min_size=4, max_size=4), st.lists(st.integers(1, 64)))
def test_any_stream_of_frames_in_any_chunking(
    items: list[tuple[int, str]], mask: bytes, chunks: list[int]
) -> None:
    # At most 125 bytes (a ping's limit), cut at a character boundary so a text frame
    # stays valid UTF-8 (a cut inside a character would rightly be refused with 1007).
    fitted = [(op, t.encode()[:125].decode("utf-8", "ignore").encode()) for op, t in items]
    wire = b"".join(build_frame(op, p, mask=mask) for op, p in fitted)
    want = [Message(op, p) for op, p in fitted]
    reader, got, at = FrameReader(), [], 0
    for size in chunks:
        got += reader.feed(wire[at : at + size])
        at += size
    got += reader.feed(wire[at:])
    assert got == want


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_give_frames_or_a_documented_close_code(data: bytes) -> None:
    try:
        FrameReader(1000).feed(data)
    except ProtocolError as exc:
        assert exc.close_code in (1002, 1007, 1009)


# ---------------------------------------------------------------------------------------
# wsproto as the reference peer
# ---------------------------------------------------------------------------------------


def open_wsproto_client() -> WSConnection:
    conn = WSConnection(ConnectionType.CLIENT)
    req = parse_request(conn.send(Request(host="example.com", target="/")))
    assert req is not None
    conn.receive_data(build_101(req.known[b"sec-websocket-key"]))
    assert isinstance(next(conn.events()), AcceptConnection)
    return conn


def as_messages(events: Iterator[Event]) -> list[Message]:
    """as_messages joins wsproto's partial message events into whole messages."""
    out: list[Message] = []
    data = bytearray()
    for event in events:
        if isinstance(event, TextMessage | BytesMessage):
            raw = event.data.encode() if isinstance(event.data, str) else event.data
            data += raw
            if event.message_finished:
                opcode = OP_TEXT if isinstance(event, TextMessage) else OP_BINARY
                out.append(Message(opcode, bytes(data)))
                data.clear()
        elif isinstance(event, Ping):
            out.append(Message(OP_PING, bytes(event.payload)))
        elif isinstance(event, Pong):
            out.append(Message(OP_PONG, bytes(event.payload)))
        elif isinstance(event, CloseConnection):
            reason = event.reason or ""
            payload = b"" if event.code == 1005 else event.code.to_bytes(2, "big")
            out.append(Message(OP_CLOSE, payload + reason.encode()))
    return out


SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]


def wsproto_events(size: int) -> list[tuple[Event, Message]]:
    text = ("é" * size)[: size // 2] + "a" * (size - 2 * (size // 2))
    raw = os.urandom(size)
    return [
        (TextMessage(data=text), Message(OP_TEXT, text.encode())),
        (BytesMessage(data=raw), Message(OP_BINARY, raw)),
        (Ping(payload=raw[:125]), Message(OP_PING, raw[:125])),
        (Pong(payload=raw[:125]), Message(OP_PONG, raw[:125])),
    ]


@pytest.mark.parametrize("size", SIZES)
def test_frames_from_a_wsproto_client_parse_to_the_same_messages(size: int) -> None:
    conn = open_wsproto_client()
    reader = FrameReader(max_message=1 << 20)
    for event, message in wsproto_events(size):
        wire = conn.send(event)
        assert wire[1] & 0x80, "wsproto clients mask"
        assert reader.feed(wire) == [message]


def test_fragmented_wsproto_messages_and_close() -> None:
    conn = open_wsproto_client()
    wire = conn.send(TextMessage(data="frag", message_finished=False))
    wire += conn.send(Ping(payload=b"mid"))
    wire += conn.send(TextMessage(data="ment ✓", message_finished=True))
    wire += conn.send(BytesMessage(data=b"\x00" * 70000, message_finished=False))
    wire += conn.send(BytesMessage(data=b"\x01", message_finished=True))
    wire += conn.send(CloseConnection(code=CloseReason.GOING_AWAY, reason="bye"))
    assert FrameReader().feed(wire) == [
        Message(OP_PING, b"mid"),
        Message(OP_TEXT, "fragment ✓".encode()),
        Message(OP_BINARY, b"\x00" * 70000 + b"\x01"),
        Message(OP_CLOSE, b"\x03\xe9bye"),
    ]


@pytest.mark.parametrize("size", SIZES)
def test_frames_built_here_parse_identically_in_a_wsproto_client(size: int) -> None:
    conn = open_wsproto_client()
    for _, message in wsproto_events(size):
        conn.receive_data(build_frame(message.opcode, message.payload))
        assert as_messages(conn.events()) == [message]


def test_fragments_and_close_built_here_parse_in_wsproto() -> None:
    conn = open_wsproto_client()
    wire = (
        build_frame(OP_TEXT, "a€"[:1].encode(), fin=False)
        + build_frame(OP_PING, b"x")
        + build_frame(OP_CONTINUATION, "€".encode())
        + build_close(1001, "going")
    )
    conn.receive_data(wire)
    assert as_messages(conn.events()) == [
        Message(OP_PING, b"x"),
        Message(OP_TEXT, "a€".encode()),
        Message(OP_CLOSE, b"\x03\xe9going"),
    ]


# ---------------------------------------------------------------------------------------
# No over-read: input placed right before a PROT_NONE page
# ---------------------------------------------------------------------------------------


def test_frame_parser_never_reads_past_the_input(guarded_page: GuardedPage) -> None:
    f = ffi.new("lmw_frame *")
    for length in (0, 5, 126, 65536):
        frame = build_frame(OP_BINARY, bytes(length), mask=MASK)[:14]
        for cut in range(len(frame) + 1):
            rc = lib.lmw_parse_frame(guarded_page.place(frame[:cut]), cut, 0, 1, f)
            assert rc == lib.LMW_INCOMPLETE or 2 <= rc <= cut


def test_unmask_never_touches_bytes_past_the_input(guarded_page: GuardedPage) -> None:
    for length in range(0, 70):
        for phase in range(4):
            data = os.urandom(length)
            ptr = guarded_page.place(data)
            lib.lmw_unmask(ptr, length, MASK, phase)
            start = guarded_page.page - length
            assert guarded_page.map[start : guarded_page.page] == xor_reference(data, MASK, phase)
