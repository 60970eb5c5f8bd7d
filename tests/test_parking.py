"""Parked handshakes (issue 11): what the C runtime does while an off-loop hook decides.

An upgrade or plain HTTP request whose hook is ``async def`` (or runs on a hook thread) is
parked in C (lmw_park) until the hook answers: its socket is not read, a client that hangs
up frees the slot at once, handshake_timeout still runs (408), shutdown answers 503. These
tests drive a Gateway in this process with raw sockets, so that the wire is visible; every
hook waits on a Gate the test opens, and every wait is bounded (tests/support/waiting.py).
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import gc
import hashlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest

from lowmemws import Accept, Config, Connection, Gateway, Request, Response
from tests.support import waiting
from tests.support.wire import read_until

DEADLINE = 10.0  # bounds every wait; not a performance figure
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

wait_until = waiting.waiter(DEADLINE)


class Gate:
    """Gate holds a hook until the test opens it (or DEADLINE passes)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.calls = 0

    async def wait(self) -> None:
        self.calls += 1
        self.entered.set()
        deadline = time.monotonic() + DEADLINE
        while not self.opened.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)


def upgrade_request(port: int) -> tuple[bytes, bytes]:
    """upgrade_request returns an upgrade head and the Sec-WebSocket-Accept it expects."""
    key = base64.b64encode(os.urandom(16))
    head = (
        b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
        % (port, key)
    )
    return head, base64.b64encode(hashlib.sha1(key + GUID).digest())


def masked(opcode: int, payload: bytes) -> bytes:
    """masked is a client frame (payload < 126 bytes)."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)


def read_response(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """read_response reads an HTTP response head; returns (status, head, what followed)."""
    data = read_until(sock, b"\r\n\r\n", timeout=DEADLINE)
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no response head: {data!r}"
    return int(head.split(b" ", 2)[1]), head, rest


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    sock.settimeout(DEADLINE)
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_frames(sock: socket.socket, buf: bytes, count: int) -> list[tuple[int, bytes]]:
    """read_frames reads count unmasked server frames, starting with the bytes in buf."""
    frames: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + DEADLINE
    while len(frames) < count:
        if len(buf) >= 2:
            n = buf[1] & 0x7F
            at = 2
            if n == 126:
                n, at = struct.unpack(">H", buf[2:4])[0], 4
            elif n == 127:
                n, at = struct.unpack(">Q", buf[2:10])[0], 10
            if len(buf) >= at + n:
                frames.append((buf[0] & 0x0F, buf[at : at + n]))
                buf = buf[at + n :]
                continue
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(65536)
        assert chunk, f"the server closed after {len(frames)} of {count} frames"
        buf += chunk
    return frames


def nothing_arrives(sock: socket.socket, seconds: float = 0.2) -> bool:
    """nothing_arrives: no byte comes within seconds (a check of silence, not of speed)."""
    sock.settimeout(seconds)
    try:
        sock.recv(1)  # a byte, or the end of the stream: something happened
    except TimeoutError:
        return True
    return False


def lowmemws_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lowmemws" and r.levelno >= logging.WARNING]


def parked_gateway(make_gateway: Callable[..., Gateway], gate: Gate, **config: object) -> Gateway:
    """parked_gateway: an async on_connect held by gate (then Accept), an echo on_message."""
    gateway = make_gateway(Config(**config))  # type: ignore[arg-type]

    @gateway.on_connect
    async def decide(request: Request) -> Accept:
        await gate.wait()
        return Accept(user=7)

    @gateway.on_message
    def echo(conn: Connection, message: str | bytes) -> None:
        conn.send(message)

    return gateway.start()


def wait_parked(gateway: Gateway, gate: Gate, n: int = 1) -> None:
    assert gate.entered.wait(DEADLINE), "the hook was never called"
    wait_until(lambda: gateway.stats()["handshakes_parked"] == n, f"{n} parked handshake(s)")
    wait_until(lambda: gateway.stats()["hooks_in_flight"] == n, f"{n} hook(s) in flight")


# -- an upgrade parked, then accepted ----------------------------------------------------------


def test_a_parked_upgrade_accepted_later_gets_its_101_and_works(
    make_gateway: Callable[..., Gateway],
) -> None:
    gate = Gate()
    gateway = parked_gateway(make_gateway, gate)
    head, accept = upgrade_request(gateway.port)
    with connect(gateway.port) as sock:
        sock.sendall(head)
        wait_parked(gateway, gate)
        assert gateway.stats()["handshakes"] == 1
        assert nothing_arrives(sock), "an answer before the hook decided"
        gate.opened.set()
        status, response, rest = read_response(sock)
        assert status == 101
        assert b"\r\nSec-WebSocket-Accept: " + accept + b"\r\n" in response + b"\r\n"
        wait_until(lambda: gateway.stats()["handshakes_parked"] == 0, "the parked one to go")
        stats = gateway.stats()
        assert (stats["handshakes"], stats["connections"], stats["handshakes_total"]) == (0, 1, 1)
        sock.sendall(masked(1, b"hello"))
        assert read_frames(sock, rest, 1) == [(1, b"hello")]
        assert gateway.send_to_user(7, "tagged") == 1
        assert read_frames(sock, b"", 1) == [(1, b"tagged")]


def test_frames_sent_before_the_101_are_handled_after_it_in_order(
    make_gateway: Callable[..., Gateway],
) -> None:
    gate = Gate()
    gateway = make_gateway()
    seen: list[str | bytes] = []

    @gateway.on_connect
    async def decide(request: Request) -> Accept:
        await gate.wait()
        seen.append("connect")
        return Accept()

    @gateway.on_open
    def opened(conn: Connection) -> None:
        seen.append("open")

    @gateway.on_message
    def echo(conn: Connection, message: str | bytes) -> None:
        seen.append(message)
        conn.send(message)

    gateway.start()
    head, _ = upgrade_request(gateway.port)
    with connect(gateway.port) as sock:
        # the first frame in the head's segment (read with it), the rest while parked (left
        # in the kernel: a parked socket is not read)
        sock.sendall(head + masked(1, b"m1"))
        wait_parked(gateway, gate)
        sock.sendall(masked(1, b"m2") + masked(2, b"m3") + masked(1, b"m4"))
        assert nothing_arrives(sock), "an answer before the hook decided"
        assert seen == []
        gate.opened.set()
        status, _, rest = read_response(sock)
        assert status == 101
        frames = read_frames(sock, rest, 4)
        assert frames == [(1, b"m1"), (1, b"m2"), (2, b"m3"), (1, b"m4")]
        assert seen == ["connect", "open", "m1", "m2", b"m3", "m4"]


# -- the client leaves while parked ------------------------------------------------------------


def test_a_parked_client_that_hangs_up_frees_its_slot_at_once(
    make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lowmemws")
    gate = Gate()
    gateway = parked_gateway(make_gateway, gate)
    closed: list[int] = []
    opened: list[int] = []
    gateway.on_close(lambda conn, code: closed.append(code))
    gateway.on_open(lambda conn: opened.append(conn.user))
    head, _ = upgrade_request(gateway.port)
    sock = connect(gateway.port)
    sock.sendall(head)
    wait_parked(gateway, gate)
    sock.close()
    # freed while the hook still runs: not at its deadline, not when the hook answers
    wait_until(
        lambda: (gateway.stats()["handshakes"], gateway.stats()["handshakes_parked"]) == (0, 0),
        "the hung-up client's slot to be freed",
    )
    assert not gate.opened.is_set() and gateway.stats()["hooks_in_flight"] == 1
    gate.opened.set()  # the hook now accepts a client that is gone
    wait_until(lambda: gateway.stats()["hooks_in_flight"] == 0, "the late Accept")
    stats = gateway.stats()
    assert (stats["connections"], stats["handshakes_total"], stats["rejects_total"]) == (0, 0, 0)
    assert stats["handshake_timeouts_total"] == 0
    assert gateway.connection_count == 0
    assert closed == [] and opened == []  # the late Accept was dropped silently
    assert lowmemws_records(caplog) == []


def test_a_parked_http_request_from_a_half_closed_client_gets_its_response(
    make_gateway: Callable[..., Gateway],
) -> None:
    gate = Gate()
    gateway = make_gateway()

    @gateway.on_http
    async def slow(request: Request) -> Response:
        await gate.wait()
        return Response(200, f"late {request.path}")

    gateway.start()
    with connect(gateway.port) as sock:
        sock.sendall(b"GET /report HTTP/1.1\r\nHost: a\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)  # nothing more to send; still reading
        wait_parked(gateway, gate)
        assert nothing_arrives(sock), "an answer before the hook decided"
        assert gateway.stats()["handshakes_parked"] == 1  # the half close did not end it
        gate.opened.set()
        data = read_to_eof(sock)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert data.endswith(b"\r\n\r\nlate /report")
    wait_until(lambda: gateway.stats()["handshakes"] == 0, "the request to end")
    assert gateway.stats()["http_requests_total"] == 1


# -- the server answers for the hook -----------------------------------------------------------


def test_a_parked_upgrade_past_handshake_timeout_gets_408(
    make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lowmemws")
    gate = Gate()
    gateway = parked_gateway(make_gateway, gate, handshake_timeout=0.3)
    opened: list[int] = []
    gateway.on_open(lambda conn: opened.append(conn.user))
    head, _ = upgrade_request(gateway.port)
    try:
        with connect(gateway.port) as sock:
            sock.sendall(head)
            assert gate.entered.wait(DEADLINE)
            status, _, _ = read_response(sock)
            assert status == 408
            read_to_eof(sock)
        stats = gateway.stats()
        assert stats["handshake_timeouts_total"] == 1
        assert stats["handshakes_parked"] == 0
        assert gateway.stats()["hooks_in_flight"] == 1  # the hook had not answered yet
    finally:
        gate.opened.set()
    wait_until(lambda: gateway.stats()["hooks_in_flight"] == 0, "the late Accept")
    stats = gateway.stats()
    assert (stats["connections"], stats["handshakes"], stats["handshakes_total"]) == (0, 0, 0)
    assert opened == []
    assert lowmemws_records(caplog) == []


def test_stop_while_parked_answers_503(make_gateway: Callable[..., Gateway]) -> None:
    gate = Gate()
    gateway = make_gateway(Config(shutdown_timeout=DEADLINE))

    @gateway.on_connect
    async def decide(request: Request) -> Accept:
        await gate.wait()
        return Accept()

    @gateway.on_http
    async def slow(request: Request) -> Response:
        await gate.wait()
        return Response(200, "late")

    gateway.start()
    head, _ = upgrade_request(gateway.port)
    upgrade = connect(gateway.port)
    plain = connect(gateway.port)
    stopper = threading.Thread(target=gateway.stop, kwargs={"timeout": DEADLINE})
    try:
        upgrade.sendall(head)
        plain.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        assert gate.entered.wait(DEADLINE)
        wait_until(lambda: gateway.stats()["handshakes_parked"] == 2, "two parked requests")
        stopper.start()  # waits for the hooks in flight, up to shutdown_timeout
        for sock in (upgrade, plain):
            status, response, _ = read_response(sock)
            assert status == 503, response
            read_to_eof(sock)
        assert gateway.stats()["handshakes_parked"] == 0
    finally:
        gate.opened.set()
        if stopper.is_alive() or stopper.ident is not None:
            stopper.join(DEADLINE)
        upgrade.close()
        plain.close()
    assert not stopper.is_alive()


# -- memory ------------------------------------------------------------------------------------


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_in_use() -> int:
    """malloc_in_use: bytes the C allocator has handed out and not had back (every arena)."""
    libc = ctypes.CDLL(None)
    mallinfo2 = getattr(libc, "mallinfo2", None)
    if mallinfo2 is None:
        pytest.skip("mallinfo2 needs glibc 2.33")
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def open_idle(gateway: Gateway, n: int) -> tuple[list[socket.socket], int]:
    """open_idle opens n WebSocket connections and returns them with the allocator's growth."""
    gc.collect()
    before = malloc_in_use()
    socks = []
    for _ in range(n):
        sock = connect(gateway.port)
        sock.sendall(upgrade_request(gateway.port)[0])
        socks.append(sock)
    for sock in socks:
        assert read_response(sock)[0] == 101
    wait_until(lambda: gateway.stats()["connections"] == n, f"{n} open connections", 60)
    wait_until(lambda: gateway.stats()["hooks_in_flight"] == 0, "the hooks to finish", 60)
    gc.collect()
    return socks, malloc_in_use() - before


def test_an_idle_connection_after_a_parked_upgrade_holds_no_ext(
    make_gateway: Callable[..., Gateway],
) -> None:
    # the key copied into the ext of a parked upgrade (lmw_park) is dropped with the ext at
    # its 101 (lmw__ext_trim): idle connections upgraded after parking cost the allocator
    # what those upgraded at once cost. An ext is ~176 bytes with malloc's header; the
    # margin is half of that per connection.
    n = 2000
    ext = 176
    inline = make_gateway(Config(max_connections=3 * n))
    inline.on_connect(lambda request: Accept())  # a plain hook, on the loop: never parked
    inline.start()
    parked = make_gateway(Config(max_connections=3 * n, hook_queue=4 * n))

    @parked.on_connect
    async def decide(request: Request) -> Accept:
        await asyncio.sleep(0)
        return Accept()

    parked.start()
    socks, grown_inline = open_idle(inline, n)
    for sock in socks:
        sock.close()
    wait_until(lambda: inline.stats()["connections"] == 0, "the first crowd to leave", 60)
    socks, grown_parked = open_idle(parked, n)
    try:
        assert parked.stats()["handshakes_total"] == n
        per_connection = (grown_parked - grown_inline) / n
        assert per_connection < ext / 2, (
            f"{per_connection:.0f} more bytes per idle connection after parking "
            f"({grown_parked} against {grown_inline} for {n} connections)"
        )
    finally:
        for sock in socks:
            sock.close()
