"""Raw-socket tools for the adversarial tests: a gateway child, frames, what the wire says.

Everything here reads the outcome from the wire, as a client would see it: the status line
of an HTTP answer, the code of a close frame, or the end of the TCP connection. Every wait is
bounded by a timeout so a misbehaving server fails a test instead of hanging it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.servers import ServerProcess, start_cli_server
from tests.support.waiting import wait_until
from tests.support.wire import read_until
from tests.support.wsproto_client import WsprotoClient

MiB = 1 << 20
SERVER_SCRIPT = Path(__file__).with_name("gateway_server.py")
WAIT = 10.0  # bounds every wait on the server; not a performance figure
MASK = b"\x37\xfa\x21\x3d"


class WireError(AssertionError):
    """WireError: the server sent something other than what the test reads for."""


def start_gateway(config: dict[str, object]) -> ServerProcess:
    """start_gateway starts gateway_server.py with Config(**config) on a free loopback port."""
    command = [sys.executable, str(SERVER_SCRIPT), "--config", json.dumps(config)]
    return start_cli_server(command)


def rss_bytes(pid: int) -> int:
    """rss_bytes is the resident set size of process pid (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise WireError(f"no VmRSS for pid {pid}")


def connect(server: ServerProcess, source: str | None = None) -> socket.socket:
    """connect opens a TCP connection to server (from source address, if given)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    if source is not None:
        sock.bind((source, 0))
    sock.connect((server.host, server.port))
    return sock


def upgrade_head(
    server: ServerProcess,
    *,
    method: str = "GET",
    version: str | None = "13",
    key: str | None = None,
    extra: str = "",
) -> bytes:
    """upgrade_head builds a WebSocket upgrade request; None leaves a header out."""
    key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"{method} /chat HTTP/1.1",
        f"Host: {server.host}:{server.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
    ]
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")


def recv_until(sock: socket.socket, marker: bytes, limit: int = 1 << 16) -> bytes:
    """recv_until reads until marker has arrived (or EOF); returns all bytes read."""
    return read_until(sock, marker, limit=limit, timeout=WAIT)


def open_websocket(server: ServerProcess, source: str | None = None) -> socket.socket:
    """open_websocket completes an upgrade on a raw socket (nothing read past the 101)."""
    sock = connect(server, source)
    sock.sendall(upgrade_head(server))
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise WireError(f"the server closed during the upgrade: {head!r}")
        head += byte
    if not head.startswith(b"HTTP/1.1 101 "):
        raise WireError(f"upgrade refused: {head!r}")
    return sock


def http_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """http_answer reads an HTTP response to EOF: (status, headers lower-cased, body)."""
    data = b""
    deadline = time.monotonic() + WAIT
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise WireError(f"no HTTP status line in {data[:200]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers, body


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = MASK,
    length: int | None = None,
) -> bytes:
    """frame builds one client frame (RFC 6455 5.2); length overrides the declared length."""
    declared = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask is not None else 0
    if declared < 126:
        head += bytes([bit | declared])
    elif declared <= 0xFFFF:
        head += bytes([bit | 126]) + struct.pack("!H", declared)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", declared)
    if mask is None:
        return head + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def close_payload(code: int, reason: bytes = b"") -> bytes:
    """close_payload is the body of a close frame (RFC 6455 5.5.1)."""
    return struct.pack("!H", code) + reason


class ServerFrames:
    """ServerFrames reads the server's (unmasked) frames from a raw socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self, n: int, deadline: float) -> bool:
        while len(self.buf) < n:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return False
            if not chunk:
                return False
            self.buf += chunk
        return True

    def next(self, deadline: float) -> tuple[int, bool, bytes] | None:
        """next returns (opcode, fin, payload) of the next frame, or None at EOF."""
        if not self._fill(2, deadline):
            return None
        b0, b1 = self.buf[0], self.buf[1]
        if b1 & 0x80:
            raise WireError("the server sent a masked frame")
        n, at = b1 & 0x7F, 2
        if n == 126:
            if not self._fill(4, deadline):
                return None
            n, at = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            if not self._fill(10, deadline):
                return None
            n, at = struct.unpack("!Q", self.buf[2:10])[0], 10
        if not self._fill(at + n, deadline):
            return None
        payload = self.buf[at : at + n]
        self.buf = self.buf[at + n :]
        return b0 & 0x0F, bool(b0 & 0x80), payload


def close_code(sock: socket.socket, timeout: float = WAIT) -> int | None:
    """close_code reads frames until the server's close frame and returns its code.

    None means the TCP connection ended without a close frame; 1005 a close frame with no
    code. Data frames before the close are skipped.
    """
    frames = ServerFrames(sock)
    deadline = time.monotonic() + timeout
    while True:
        got = frames.next(deadline)
        if got is None:
            return None
        opcode, _, payload = got
        if opcode == 8:
            return struct.unpack("!H", payload[:2])[0] if payload else 1005


def read_message(sock: socket.socket, timeout: float = WAIT) -> tuple[int, bytes]:
    """read_message returns (opcode, payload) of the next whole data message."""
    frames = ServerFrames(sock)
    deadline = time.monotonic() + timeout
    opcode, parts = 0, []
    while True:
        got = frames.next(deadline)
        if got is None:
            raise WireError("the server closed the connection instead of a message")
        op, fin, payload = got
        if op >= 8:
            if op == 8:
                raise WireError(f"close frame instead of a message: {payload!r}")
            continue
        opcode = opcode or op
        parts.append(payload)
        if fin:
            if frames.buf:
                raise WireError("read_message read past one message")
            return opcode, b"".join(parts)


def connection_ends(sock: socket.socket, timeout: float = WAIT) -> bool:
    """connection_ends reads and discards until EOF or a reset; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


def server_stats(server: ServerProcess) -> dict[str, object]:
    """server_stats returns the gateway's runtime counters (GET /stats)."""
    with connect(server) as sock:
        sock.sendall(f"GET /stats HTTP/1.1\r\nHost: {server.host}\r\n\r\n".encode())
        status, _, body = http_answer(sock)
    if status != 200:
        raise WireError(f"GET /stats answered {status}")
    stats = json.loads(body)
    assert isinstance(stats, dict)
    return stats


def wait_for(predicate: object, timeout: float = WAIT, what: str = "condition") -> None:
    """wait_for polls predicate() every 50 ms until it is true; WireError on timeout."""
    assert callable(predicate)
    wait_until(predicate, what, timeout, interval=0.05, error=WireError)


class Control:
    """Control is a well-behaved wsproto client whose echo must keep working throughout."""

    def __init__(self, server: ServerProcess) -> None:
        self.client = WsprotoClient(server.host, server.port, timeout=WAIT)
        self.count = 0

    def echo_ok(self) -> None:
        """echo_ok sends a text and a binary message and checks both echoes."""
        self.count += 1
        text = f"control {self.count} \u00e9\u6f22"
        self.client.send_message(text)
        assert self.client.receive_message() == text
        binary = os.urandom(300)
        self.client.send_message(binary)
        assert self.client.receive_message() == binary

    def close(self) -> None:
        self.client.sock.close()


#: Small caps and short deadlines so every limit is reached in well under a second or two.
SMALL_LIMITS: dict[str, object] = {
    "handshake_timeout": 1.0,
    "close_timeout": 1.0,
    "max_head": 2048,
    "max_http_body": 4096,
    "max_message_size": 1 * MiB,
    "spill_budget": 8 * MiB,
}

#: What the attacks of one test may add to the server's RSS over its warmed-up figure: the
#: spill budget (8 MiB) and the read pool (16 x 64 KiB) plus allocator slack.
RSS_MARGIN = 24 * MiB


class Guarded:
    """Guarded is a running gateway, its control client and its RSS bound.

    still_serving() is what every adversarial test ends with: the control client's echo
    works and the server's RSS is within RSS_MARGIN of its figure after warm-up.
    """

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.control = Control(server)
        self.control.echo_ok()
        self.baseline = rss_bytes(server.pid)
        self.peak = self.baseline

    def rss(self) -> int:
        """rss is the server's RSS now (and updates the peak seen)."""
        now = rss_bytes(self.server.pid)
        self.peak = max(self.peak, now)
        return now

    def still_serving(self) -> None:
        """still_serving asserts the control echo and the RSS bound."""
        assert self.server.proc.poll() is None, f"server died:\n{self.server.output()}"
        self.control.echo_ok()
        rss = self.rss()
        assert rss <= self.baseline + RSS_MARGIN, (
            f"server RSS {rss / MiB:.1f} MiB, over {self.baseline / MiB:.1f} MiB + "
            f"{RSS_MARGIN / MiB:.0f} MiB"
        )


@contextlib.contextmanager
def guarded_gateway(config: dict[str, object]) -> Iterator[Guarded]:
    """guarded_gateway starts a gateway with Config(**config) and yields it as Guarded; at the
    end its control client is closed and the server stopped."""
    server = start_gateway(config)
    try:
        rig = Guarded(server)
        yield rig
        rig.control.close()
    finally:
        server.stop()
