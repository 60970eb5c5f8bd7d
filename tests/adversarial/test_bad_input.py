"""One test per bad input: each gets its specific outcome, read from the wire, while a
control client's echo keeps working and the server's RSS stays within adversary.RSS_MARGIN
of its warmed-up figure.

The gateway runs with adversary.SMALL_LIMITS: handshake_timeout 1 s, max_head 2048 B,
max_http_body 4096 B, max_message_size 1 MiB, spill_budget 8 MiB. HTTP answers are RFC 7231
and RFC 6585 statuses; close codes are RFC 6455 section 7.4.1.
"""

from __future__ import annotations

import select
import socket
import struct
import time

import pytest

from tests.adversarial.adversary import (
    SMALL_LIMITS,
    Guarded,
    MiB,
    close_code,
    close_payload,
    connect,
    connection_ends,
    frame,
    http_answer,
    open_websocket,
    read_message,
    server_stats,
    upgrade_head,
    wait_for,
)

TEXT, BINARY, CLOSE, PING, PONG, CONT = 1, 2, 8, 9, 10, 0
HANDSHAKE_TIMEOUT = float(SMALL_LIMITS["handshake_timeout"])  # type: ignore[arg-type]
MAX_HEAD = int(SMALL_LIMITS["max_head"])  # type: ignore[call-overload]
MAX_BODY = int(SMALL_LIMITS["max_http_body"])  # type: ignore[call-overload]
MAX_MESSAGE = int(SMALL_LIMITS["max_message_size"])  # type: ignore[call-overload]
#: The sweep runs every second: a deadline is noticed at most this late (a bound, not a
#: performance figure).
SWEEP_SLACK = 1.5


def expect_status(guarded: Guarded, request: bytes, status: int) -> dict[str, str]:
    """expect_status sends request on a new connection and checks the status it gets back,
    and that the server then closes the connection."""
    with connect(guarded.server) as sock:
        sock.sendall(request)
        got, headers, _ = http_answer(sock)
    assert got == status
    return headers


def expect_close(guarded: Guarded, data: bytes, code: int) -> None:
    """expect_close opens a WebSocket, sends data, and checks the close code it gets back
    and that the TCP connection then ends."""
    with open_websocket(guarded.server) as sock:
        sock.sendall(data)
        assert close_code(sock) == code
        assert connection_ends(sock)


def timed_answer(guarded: Guarded, data: bytes) -> tuple[int, float]:
    """timed_answer sends data on a new connection and returns the HTTP status of the
    answer and the seconds from the send to the answer."""
    with connect(guarded.server) as sock:
        sock.sendall(data)
        started = time.monotonic()
        status, _, _ = http_answer(sock)
        return status, time.monotonic() - started


# ------------------------------------------------------------------ handshake


def test_slowloris_head_gets_408_after_the_handshake_deadline(guarded: Guarded) -> None:
    status, waited = timed_answer(guarded, b"GET /chat HTTP/1.1\r\nHost: x\r\n")
    assert status == 408
    assert HANDSHAKE_TIMEOUT - 0.2 <= waited <= HANDSHAKE_TIMEOUT + SWEEP_SLACK
    guarded.still_serving()


def trickle_until_answered(sock: socket.socket, data: bytes) -> float:
    """trickle_until_answered sends data a byte every 200 ms until the server answers (or
    closes) and returns the seconds from the first byte to the answer; the bytes never all
    go, and the wait is capped at twice the deadline plus the sweep slack."""
    started = time.monotonic()
    limit = started + 2 * HANDSHAKE_TIMEOUT + 2 * SWEEP_SLACK
    for byte in data:
        readable, _, _ = select.select([sock], [], [], 0.2)
        if readable or time.monotonic() > limit:
            break
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
    select.select([sock], [], [], max(limit - time.monotonic(), 0))
    return time.monotonic() - started


def test_slowloris_trickling_a_byte_at_a_time_still_gets_408_at_the_deadline(
    guarded: Guarded,
) -> None:
    """A head that keeps arriving, one byte every 200 ms, must still be complete within
    handshake_timeout (a deadline, not an idle timer), else one client holds a handshake
    slot for max_head x 200 ms (7 minutes here, 27 with the defaults)."""
    head = upgrade_head(guarded.server, extra="X-Slow: " + "a" * 200 + "\r\n")
    with connect(guarded.server) as sock:
        waited = trickle_until_answered(sock, head[:-2])
        status, _, _ = http_answer(sock)
    assert status == 408
    assert waited <= HANDSHAKE_TIMEOUT + SWEEP_SLACK
    guarded.still_serving()


def test_head_over_the_cap_gets_431(guarded: Guarded) -> None:
    head = upgrade_head(guarded.server, extra="X-Big: " + "b" * MAX_HEAD + "\r\n")
    expect_status(guarded, head, 431)
    guarded.still_serving()


def test_head_over_the_cap_without_an_end_gets_431_at_once(guarded: Guarded) -> None:
    with connect(guarded.server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"c" * (MAX_HEAD + 100))
        started = time.monotonic()
        status, _, _ = http_answer(sock)
    assert status == 431
    assert time.monotonic() - started < HANDSHAKE_TIMEOUT  # the cap, not the deadline
    guarded.still_serving()


@pytest.mark.parametrize("method", ["POST", "PUT", "HEAD"])
def test_non_get_upgrade_gets_405_allowing_get(guarded: Guarded, method: str) -> None:
    headers = expect_status(guarded, upgrade_head(guarded.server, method=method), 405)
    assert headers.get("allow") == "GET"
    guarded.still_serving()


@pytest.mark.parametrize("version", [None, "8", "12", "14", "13, 8", ""])
def test_missing_or_unsupported_version_gets_426_naming_13(
    guarded: Guarded, version: str | None
) -> None:
    headers = expect_status(guarded, upgrade_head(guarded.server, version=version), 426)
    assert headers.get("sec-websocket-version") == "13"
    guarded.still_serving()


@pytest.mark.parametrize(
    "key",
    [
        "",
        "abc",
        "dGhlIHNhbXBsZSBub25jZQ",  # 16 bytes but the padding is missing
        "dGhlIHNhbXBsZSBub25jZQ===",
        "dGhlIHNhbXBsZSBub25j",  # 15 bytes decoded
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==",  # 22 bytes decoded
        "dGhlIHNhbXBsZSBub25j!Q==",
    ],
)
def test_bad_sec_websocket_key_gets_400(guarded: Guarded, key: str) -> None:
    expect_status(guarded, upgrade_head(guarded.server, key=key), 400)
    guarded.still_serving()


def test_missing_sec_websocket_key_gets_400(guarded: Guarded) -> None:
    head = upgrade_head(guarded.server).replace(b"Sec-WebSocket-Key:", b"X-Not-A-Key:")
    expect_status(guarded, head, 400)
    guarded.still_serving()


# ------------------------------------------------------------------ frames


def test_unmasked_frame_gets_1002(guarded: Guarded) -> None:
    expect_close(guarded, frame(TEXT, b"hello", mask=None), 1002)
    guarded.still_serving()


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
def test_reserved_bits_get_1002(guarded: Guarded, rsv: int) -> None:
    expect_close(guarded, frame(TEXT, b"hello", rsv=rsv), 1002)
    guarded.still_serving()


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
def test_unknown_opcode_gets_1002(guarded: Guarded, opcode: int) -> None:
    expect_close(guarded, frame(opcode, b"hello"), 1002)
    guarded.still_serving()


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_control_frame_over_125_bytes_gets_1002(guarded: Guarded, opcode: int) -> None:
    payload = close_payload(1000, b"r" * 124) if opcode == CLOSE else b"p" * 126
    expect_close(guarded, frame(opcode, payload), 1002)
    guarded.still_serving()


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_fragmented_control_frame_gets_1002(guarded: Guarded, opcode: int) -> None:
    payload = close_payload(1000) if opcode == CLOSE else b"ping"
    expect_close(guarded, frame(opcode, payload, fin=False), 1002)
    guarded.still_serving()


def test_bad_utf8_in_a_single_text_frame_gets_1007(guarded: Guarded) -> None:
    expect_close(guarded, frame(TEXT, b"valid then \xc3\x28 invalid"), 1007)
    guarded.still_serving()


def test_bad_utf8_across_fragments_gets_1007(guarded: Guarded) -> None:
    """The first fragment ends inside a three-byte sequence that the next one breaks."""
    data = frame(TEXT, b"euro \xe2\x82", fin=False) + frame(CONT, b"(", fin=True)
    expect_close(guarded, data, 1007)
    guarded.still_serving()


def test_bad_utf8_fails_fast_before_the_message_ends(guarded: Guarded) -> None:
    """RFC 6455 8.1: an invalid fragment fails the connection without waiting for FIN."""
    expect_close(guarded, frame(TEXT, b"\xff not utf-8", fin=False), 1007)
    guarded.still_serving()


def test_utf8_split_across_fragments_is_fine(guarded: Guarded) -> None:
    with open_websocket(guarded.server) as sock:
        sock.sendall(frame(TEXT, b"euro \xe2\x82", fin=False) + frame(CONT, b"\xac!"))
        assert read_message(sock) == (TEXT, "euro \u20ac!".encode())
    guarded.still_serving()


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1012, 1015, 1016, 2000, 2999, 5000])
def test_invalid_close_code_gets_1002(guarded: Guarded, code: int) -> None:
    expect_close(guarded, frame(CLOSE, close_payload(code)), 1002)
    guarded.still_serving()


def test_one_byte_close_payload_gets_1002(guarded: Guarded) -> None:
    expect_close(guarded, frame(CLOSE, b"\x03"), 1002)
    guarded.still_serving()


def test_close_reason_not_utf8_gets_1007(guarded: Guarded) -> None:
    expect_close(guarded, frame(CLOSE, close_payload(1000, b"\xff")), 1007)
    guarded.still_serving()


def test_valid_close_code_is_echoed(guarded: Guarded) -> None:
    expect_close(guarded, frame(CLOSE, close_payload(4000, b"bye")), 4000)
    guarded.still_serving()


def test_oversized_single_frame_message_gets_1009(guarded: Guarded) -> None:
    """The header alone is enough: the payload need not be sent."""
    expect_close(guarded, frame(BINARY, b"", length=MAX_MESSAGE + 1), 1009)
    guarded.still_serving()


def test_oversized_single_frame_message_sent_whole_gets_1009(guarded: Guarded) -> None:
    with open_websocket(guarded.server) as sock:
        try:
            sock.sendall(frame(BINARY, b"z" * (MAX_MESSAGE + 1)))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert close_code(sock) == 1009
    guarded.still_serving()


def test_oversized_fragmented_message_gets_1009(guarded: Guarded) -> None:
    piece = b"f" * (MAX_MESSAGE // 4)
    data = frame(BINARY, piece, fin=False)
    data += frame(CONT, piece, fin=False) + frame(CONT, piece, fin=False)
    data += frame(CONT, piece, fin=False) + frame(CONT, b"!", fin=True)
    with open_websocket(guarded.server) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert close_code(sock) == 1009
    guarded.still_serving()


def test_message_of_exactly_the_cap_is_echoed(guarded: Guarded) -> None:
    payload = bytes(range(256)) * (MAX_MESSAGE // 256)
    with open_websocket(guarded.server) as sock:
        sock.sendall(frame(BINARY, payload[: MAX_MESSAGE // 2], fin=False))
        sock.sendall(frame(CONT, payload[MAX_MESSAGE // 2 :]))
        assert read_message(sock) == (BINARY, payload)
    guarded.still_serving()


def test_continuation_with_no_start_gets_1002(guarded: Guarded) -> None:
    expect_close(guarded, frame(CONT, b"orphan"), 1002)
    guarded.still_serving()


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_new_data_frame_inside_a_fragmented_message_gets_1002(
    guarded: Guarded, opcode: int
) -> None:
    data = frame(TEXT, b"first half", fin=False) + frame(opcode, b"a new message")
    expect_close(guarded, data, 1002)
    guarded.still_serving()


def test_control_frames_inside_a_fragmented_message_are_fine(guarded: Guarded) -> None:
    with open_websocket(guarded.server) as sock:
        sock.sendall(frame(TEXT, b"one ", fin=False) + frame(PING, b"hi"))
        sock.sendall(frame(CONT, b"two", fin=True))
        frames = [read_message_or_pong(sock) for _ in range(2)]
    assert frames == [(PONG, b"hi"), (TEXT, b"one two")]
    guarded.still_serving()


def read_message_or_pong(sock: socket.socket) -> tuple[int, bytes]:
    """read_message_or_pong reads one frame header and payload (small frames only)."""
    head = sock.recv(2, socket.MSG_WAITALL)
    n = head[1] & 0x7F
    assert n < 126
    return head[0] & 0x0F, sock.recv(n, socket.MSG_WAITALL) if n else b""


@pytest.mark.parametrize("declared", [MAX_MESSAGE + 1, 1 << 40, (1 << 63) - 1])
def test_huge_declared_length_over_the_cap_gets_1009(guarded: Guarded, declared: int) -> None:
    expect_close(guarded, frame(BINARY, b"", length=declared), 1009)
    guarded.still_serving()


def test_declared_length_with_the_msb_set_gets_1002(guarded: Guarded) -> None:
    """RFC 6455 5.2: the most significant bit of a 64-bit length must be 0."""
    head = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 1 << 63) + b"\x00\x00\x00\x00"
    expect_close(guarded, head, 1002)
    guarded.still_serving()


def test_huge_declared_length_under_the_cap_waits_with_a_bounded_spill(
    guarded: Guarded,
) -> None:
    """A frame that declares almost max_message_size and sends a little: the server keeps
    the connection open (no close, no deadline on an open connection's frame), holds at
    most the declared size, and echoes the message once the payload comes."""
    declared = MAX_MESSAGE - 16
    payload = bytes(range(256)) * (declared // 256) + b"x" * (declared % 256)
    data = frame(BINARY, payload)
    header = len(data) - declared
    before = guarded.rss()
    with open_websocket(guarded.server) as sock:
        sock.sendall(data[: header + 100])
        sock.settimeout(1.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # nothing comes back: the server waits for the payload
        spill = int(server_stats(guarded.server)["spill_bytes"])  # type: ignore[call-overload]
        assert 0 < spill <= declared + header
        guarded.still_serving()
        assert guarded.rss() <= before + 2 * declared + 4 * MiB
        sock.sendall(data[header + 100 :])
        assert read_message(sock) == (BINARY, payload)
    wait_for(lambda: server_stats(guarded.server)["spill_bytes"] == 0, what="the spill freed")
    guarded.still_serving()


def test_frames_trickled_a_byte_at_a_time_are_echoed(guarded: Guarded) -> None:
    message = "trickle \u00e9\u6f22".encode()
    data = frame(TEXT, message[:7], fin=False) + frame(PING, b"p") + frame(CONT, message[7:])
    with open_websocket(guarded.server) as sock:
        for byte in data:
            sock.sendall(bytes([byte]))
            time.sleep(0.002)
        assert read_message_or_pong(sock) == (PONG, b"p")
        assert read_message(sock) == (TEXT, message)
    guarded.still_serving()


def test_handshake_trickled_a_byte_at_a_time_completes_within_the_deadline(
    guarded: Guarded,
) -> None:
    head = upgrade_head(guarded.server)
    with connect(guarded.server) as sock:
        for byte in head:
            sock.sendall(bytes([byte]))
            time.sleep(0.002)
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 101 ")
        sock.sendall(frame(TEXT, b"after a slow head"))
        assert read_message(sock) == (TEXT, b"after a slow head")
    guarded.still_serving()


@pytest.mark.parametrize(
    "garbage",
    [
        b"this is not a websocket frame\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\xff" * 64,
    ],
)
def test_garbage_after_the_handshake_gets_1002(guarded: Guarded, garbage: bytes) -> None:
    expect_close(guarded, garbage, 1002)
    guarded.still_serving()


def test_rst_in_the_middle_of_a_frame_is_survived(guarded: Guarded) -> None:
    before = int(server_stats(guarded.server)["connections"])  # type: ignore[call-overload]
    for _ in range(20):
        sock = open_websocket(guarded.server)
        sock.sendall(frame(BINARY, b"r" * 50_000)[:20_000])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset with a frame half sent
    wait_for(
        lambda: server_stats(guarded.server)["connections"] == before,
        what="the connection count back to its value before the resets",
    )
    wait_for(lambda: server_stats(guarded.server)["spill_bytes"] == 0, what="the spills freed")
    guarded.still_serving()


# ------------------------------------------------------------------ plain HTTP


def test_slow_post_body_gets_408_after_the_deadline(guarded: Guarded) -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    status, waited = timed_answer(guarded, head + b"0123456789")
    assert status == 408
    assert HANDSHAKE_TIMEOUT - 0.2 <= waited <= HANDSHAKE_TIMEOUT + SWEEP_SLACK
    guarded.still_serving()


def test_slow_post_body_trickled_still_gets_408_at_the_deadline(guarded: Guarded) -> None:
    """A body that keeps coming, a byte every 200 ms, is still bound by the deadline."""
    with connect(guarded.server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n")
        waited = trickle_until_answered(sock, b"b" * 200)
        status, _, _ = http_answer(sock)
    assert status == 408
    assert waited <= HANDSHAKE_TIMEOUT + SWEEP_SLACK
    guarded.still_serving()


def test_post_body_is_echoed(guarded: Guarded) -> None:
    body = b"q" * MAX_BODY
    with connect(guarded.server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        sock.sendall(body)
        status, _, got = http_answer(sock)
    assert (status, got) == (200, body)
    guarded.still_serving()


@pytest.mark.parametrize("length", [MAX_BODY + 1, 1 << 40])
def test_content_length_over_the_body_cap_gets_413(guarded: Guarded, length: int) -> None:
    request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length
    expect_status(guarded, request, 413)
    guarded.still_serving()
