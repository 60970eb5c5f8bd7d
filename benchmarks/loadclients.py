"""loadclients: cheap WebSocket load clients in separate processes, shared by every benchmark.

Theory of operation
-------------------
A benchmark needs tens of thousands (up to a million) of real WebSocket connections without the
clients costing more than the servers they measure. Each *worker* is a separate Python process
(so each stays under the 20,000 open-files limit) that owns its own source addresses
(127.0.0.2, 127.0.0.3, ...; bound before connect with IP_BIND_ADDRESS_NO_PORT, so ephemeral
ports are chosen per 4-tuple and never run out), used in turn, at most SOURCE_SPAN connections
each: the kernel's search for a free ephemeral port slows down sharply as one source address
fills its port range (36,000 connections from two addresses took 12 s, from ten 2 s).
A worker uses raw non-blocking sockets and one epoll:

- ``open``: connects with a bounded number of handshakes in flight, sends a valid Upgrade
  (``GET /ws?user=N``, a fresh Sec-WebSocket-Key, optionally offering permessage-deflate),
  checks the 101 and Sec-WebSocket-Accept (RFC 6455 section 4.1), then leaves the connection idle;
- while idle (and during every command) it answers the server's pings and counts data frames;
- ``ping``: sends a ping on every connection and counts the pongs (is everyone still there?);
- ``wait_frames``: waits until every connection has received K more data frames (fan-out);
- ``echo``: request/response echo, one message in flight per connection, for a fixed time;
- ``close``: sends a close frame on every connection, waits for the server to close.

The controller (``LoadClients``) starts the workers, sends each one a JSON command line on its
stdin and reads one JSON reply line from its stdout; commands run on all workers at once.
Workers exit when their stdin closes, so they never outlive the benchmark.

Two engines run the workers. ``engine="python"`` (the default) is the Worker class below.
``engine="c"`` is ``loadclient.c``, the same worker in C for open, ping, reset and close only
(no permessage-deflate, no echo, no wait_frames): a Python worker holding 18,000 connections
cannot answer the server's heartbeat pings in time while others open theirs on the same
cores, and the server rightly drops it. The C program is compiled on first use with the
system ``cc -O2`` into ``benchmarks/build/`` (named by a hash of the source and flags, so an
edited source is rebuilt).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from typing import Any

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
IP_BIND_ADDRESS_NO_PORT = 24
MASK = b"\x37\xfa\x21\x3d"
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
RECV_SIZE = 65536
SOURCE_SPAN = 4_000
HERE = os.path.dirname(os.path.abspath(__file__))
C_SOURCE = os.path.join(HERE, "loadclient.c")
C_BUILD_DIR = os.path.join(HERE, "build")
C_FLAGS = ("-O2", "-std=c11", "-Wall", "-Wextra")
ENGINES = ("python", "c")
C_COMMANDS = ("open", "ping", "reset", "close")

CONNECTING, HANDSHAKE, OPEN, CLOSING = range(4)


def accept_value(key: bytes) -> bytes:
    """accept_value computes Sec-WebSocket-Accept for a key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def mask(payload: bytes, key: bytes = MASK) -> bytes:
    """mask XORs a payload with a 4-byte masking key (RFC 6455 section 5.3)."""
    n = len(payload)
    k = int.from_bytes((key * (n // 4 + 1))[:n], "big") if n else 0
    return (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes, rsv1: bool = False) -> bytes:
    """client_frame builds one masked, final client frame (RFC 6455 section 5.2); rsv1 marks
    a compressed message (RFC 7692 section 6)."""
    n = len(payload)
    b0 = 0x80 | (0x40 if rsv1 else 0) | opcode
    if n < 126:
        head = bytes([b0, 0x80 | n])
    elif n < 65536:
        head = bytes([b0, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + MASK + mask(payload)


def json_document(size: int) -> bytes:
    """json_document is a JSON list of mail notifications of exactly size bytes (the same
    document as servers/common.py's json_payload)."""
    items: list[str] = []
    i = 0
    while True:
        item = (
            f'{{"id":{1000 + i},"type":"mail","from":"user{i * 7 % 97}@example.com",'
            f'"subject":"Quarterly report {i}","unread":{i % 13},"ts":{1764400000 + i * 61}}}'
        )
        if len(",".join([*items, item])) + 2 > size:
            break
        items.append(item)
        i += 1
    body = "[" + ",".join(items) + "]"
    return (body + " " * (size - len(body))).encode()


def upgrade_request(host: str, port: int, path: str, key: bytes, deflate: bool) -> bytes:
    """upgrade_request builds a browser-like WebSocket Upgrade request (RFC 6455 section 4.1)."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    if deflate:
        lines.append(f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def c_worker(cc: str = "cc") -> str:
    """c_worker returns the compiled C worker (loadclient.c), compiling it on first use.

    The executable's name carries a hash of the source and the flags, so an edited source is
    compiled again; it is written to a temporary name and renamed, so concurrent runs are safe.
    """
    with open(C_SOURCE, "rb") as f:
        source = f.read()
    digest = hashlib.sha1(source + " ".join(C_FLAGS).encode()).hexdigest()[:12]
    exe = os.path.join(C_BUILD_DIR, f"loadclient-{digest}")
    if os.path.exists(exe):
        return exe
    os.makedirs(C_BUILD_DIR, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=C_BUILD_DIR, prefix=".loadclient-")
    os.close(fd)
    try:
        r = subprocess.run(
            [cc, *C_FLAGS, "-o", tmp, C_SOURCE], capture_output=True, text=True, check=False
        )
        if r.returncode:
            raise RuntimeError(f"compiling {C_SOURCE} failed:\n{r.stderr}")
        os.replace(tmp, exe)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return exe


def source_address(index: int) -> str:
    """source_address returns the index-th loopback source address: 127.0.0.2, 127.0.0.3, ..."""
    return f"127.{(index // 250) % 250}.{(index // 62500) % 250}.{2 + index % 250}"


class Conn:
    """Conn is the client side of one connection (the client's memory is not measured)."""

    __slots__ = ("sock", "state", "inbuf", "out", "key", "user", "frames", "pongs", "echo")

    def __init__(self, sock: socket.socket, key: bytes, user: int) -> None:
        self.sock = sock
        self.state = CONNECTING
        self.inbuf = b""
        self.out = b""
        self.key = key
        self.user = user
        self.frames = 0
        self.pongs = 0
        self.echo = False


class Worker:
    """Worker holds one process's share of the connections (see the module docstring)."""

    def __init__(
        self, host: str, port: int, sources: list[str], user_base: int, deflate: bool
    ) -> None:
        self.host, self.port, self.sources = host, port, sources
        self.user_base, self.deflate = user_base, deflate
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.next_user = 0
        self.in_flight = 0
        self.failed = 0
        self.lost = 0
        self.deflated = 0
        self.frames = 0
        self.payload_bytes = 0
        self.echo_frame = b""
        self.echo_until = 0.0
        self.echo_messages = 0
        self.pong_frame_cache: dict[bytes, bytes] = {}
        self.arrival_bucket = 0.0  # > 0 while cmd_arrivals counts frames per time bucket
        self.arrivals: dict[int, int] = {}

    # -- connections -------------------------------------------------------------------------

    def connect_one(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((self.sources[self.next_user % len(self.sources)], 0))
        sock.setblocking(False)
        err = sock.connect_ex((self.host, self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.failed += 1
            return
        key = base64.b64encode(os.urandom(16))
        conn = Conn(sock, key, self.user_base + self.next_user)
        self.next_user += 1
        self.conns[sock.fileno()] = conn
        self.in_flight += 1
        self.ep.register(sock.fileno(), select.EPOLLOUT)

    def drop(self, fd: int, conn: Conn, *, expected: bool) -> None:
        if conn.state in (CONNECTING, HANDSHAKE):
            self.in_flight -= 1
            self.failed += 1
        elif not expected and conn.state != CLOSING:
            self.lost += 1
        self.ep.unregister(fd)
        conn.sock.close()
        del self.conns[fd]

    def write(self, fd: int, conn: Conn, data: bytes) -> None:
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return
        if sent < len(data):
            conn.out = data[sent:]
            self.ep.modify(fd, select.EPOLLIN | select.EPOLLOUT)

    def on_writable(self, fd: int, conn: Conn) -> None:
        if conn.state == CONNECTING:
            if conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.drop(fd, conn, expected=False)
                return
            path = f"/ws?user={conn.user}"
            conn.state = HANDSHAKE
            self.ep.modify(fd, select.EPOLLIN)
            self.write(
                fd, conn, upgrade_request(self.host, self.port, path, conn.key, self.deflate)
            )
            return
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self.drop(fd, conn, expected=False)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            self.ep.modify(fd, select.EPOLLIN)

    def on_readable(self, fd: int, conn: Conn) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop(fd, conn, expected=False)
            return
        conn.inbuf = conn.inbuf + data if conn.inbuf else data
        if conn.state == HANDSHAKE and not self.finish_handshake(fd, conn):
            return
        self.parse_frames(fd, conn)

    def finish_handshake(self, fd: int, conn: Conn) -> bool:
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = conn.inbuf[:end].decode("latin-1").split("\r\n")
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        ok = head[0].split()[1:2] == ["101"]
        ok = ok and headers.get("sec-websocket-accept", "").encode() == accept_value(conn.key)
        if not ok:
            self.drop(fd, conn, expected=False)
            return False
        if "permessage-deflate" in headers.get("sec-websocket-extensions", ""):
            self.deflated += 1
        conn.inbuf = conn.inbuf[end + 4 :]
        conn.state = OPEN
        self.in_flight -= 1
        return True

    def parse_frames(self, fd: int, conn: Conn) -> None:
        buf = conn.inbuf
        n, i = len(buf), 0
        while n - i >= 2:
            b0, length = buf[i], buf[i + 1] & 0x7F
            head = 2
            if length == 126:
                if n - i < 4:
                    break
                length, head = int.from_bytes(buf[i + 2 : i + 4], "big"), 4
            elif length == 127:
                if n - i < 10:
                    break
                length, head = int.from_bytes(buf[i + 2 : i + 10], "big"), 10
            if n - i < head + length:
                break
            opcode = b0 & 0x0F
            if opcode < 3:
                if b0 & 0x80:
                    self.on_message(fd, conn, length)
            elif opcode == 9:
                self.write(fd, conn, self.pong(buf[i + head : i + head + length]))
            elif opcode == 10:
                conn.pongs += 1
            elif opcode == 8 and conn.state != CLOSING:
                conn.state = CLOSING
                self.write(fd, conn, client_frame(8, buf[i + head : i + head + 2]))
            i += head + length
        conn.inbuf = buf[i:] if i < n else b""

    def pong(self, payload: bytes) -> bytes:
        frame = self.pong_frame_cache.get(payload)
        if frame is None:
            frame = client_frame(10, payload)
            if len(self.pong_frame_cache) < 1024:
                self.pong_frame_cache[payload] = frame
        return frame

    def on_message(self, fd: int, conn: Conn, length: int) -> None:
        conn.frames += 1
        self.frames += 1
        self.payload_bytes += length
        if self.arrival_bucket:
            at = int(time.monotonic() / self.arrival_bucket)
            self.arrivals[at] = self.arrivals.get(at, 0) + 1
        if conn.echo:
            self.echo_messages += 1
            if time.monotonic() < self.echo_until:
                self.write(fd, conn, self.echo_frame)
            else:
                conn.echo = False

    # -- the loop ------------------------------------------------------------------------------

    def poll(self, timeout: float) -> None:
        for fd, ev in self.ep.poll(timeout):
            conn = self.conns.get(fd)
            if conn is None:
                continue
            if ev & select.EPOLLOUT:
                self.on_writable(fd, conn)
                if fd not in self.conns:
                    continue
            if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                self.on_readable(fd, conn)

    def run_until(self, done: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.poll(min(left, 0.2))
        return True

    def open_conns(self) -> list[tuple[int, Conn]]:
        return [(fd, c) for fd, c in self.conns.items() if c.state == OPEN]

    # -- commands --------------------------------------------------------------------------------

    def cmd_open(self, count: int, window: int, timeout: float) -> dict[str, Any]:
        start = time.monotonic()
        failed0, target = self.failed, len(self.open_conns()) + count
        remaining = count
        deadline = start + timeout
        while (remaining or self.in_flight) and time.monotonic() < deadline:
            while remaining and self.in_flight < window:
                self.connect_one()
                remaining -= 1
            self.poll(0.05)
            retry = self.failed - failed0
            if retry and not remaining and self.failed <= count:
                # Refused or reset by a full backlog: try again, bounded by the deadline and
                # by ``count`` failures in all (a dead server is not retried for minutes).
                remaining, failed0 = retry, self.failed
        opened = len(self.open_conns())
        return {
            "opened": opened,
            "wanted": target,
            "failed": self.failed,
            "deflated": self.deflated,
            "seconds": time.monotonic() - start,
        }

    def cmd_ping(self, timeout: float) -> dict[str, Any]:
        frame = client_frame(9, b"ping")
        conns = self.open_conns()
        before = {fd: c.pongs for fd, c in conns}
        for fd, c in conns:
            self.write(fd, c, frame)

        def answered() -> int:
            return sum(1 for fd, c in conns if fd in self.conns and c.pongs > before[fd])

        self.run_until(lambda: answered() == len(conns), timeout)
        return {"asked": len(conns), "answered": answered(), "lost": self.lost}

    def cmd_wait_frames(self, per_conn: int, timeout: float) -> dict[str, Any]:
        target = per_conn * len(self.open_conns())
        start = time.monotonic()
        ok = self.run_until(lambda: self.frames >= target, timeout)
        return {
            "frames": self.frames,
            "target": target,
            "bytes": self.payload_bytes,
            "ok": ok,
            "seconds": time.monotonic() - start,
        }

    def cmd_arrivals(self, per_conn: int, bucket: float, timeout: float) -> dict[str, Any]:
        """cmd_arrivals is wait_frames that also counts the frames by arrival time: buckets of
        ``bucket`` seconds of the monotonic clock, which every process of the machine shares,
        keyed by int(time / bucket) (paced fan-out, issue 18)."""
        self.arrivals, self.arrival_bucket = {}, bucket
        try:
            reply = self.cmd_wait_frames(per_conn, timeout)
        finally:
            self.arrival_bucket = 0.0
        reply["arrivals"] = {str(k): v for k, v in sorted(self.arrivals.items())}
        return reply

    def cmd_reset(self) -> dict[str, Any]:
        self.poll(0)
        self.frames = self.payload_bytes = 0
        return {"open": len(self.open_conns()), "lost": self.lost}

    def cmd_echo(self, size: int, seconds: float, connections: int) -> dict[str, Any]:
        self.echo_frame = client_frame(2, bytes(range(256)) * (size // 256) + b"e" * (size % 256))
        if self.deflated:  # compressed by the client once: each message on its own
            z = zlib.compressobj(6, zlib.DEFLATED, -15)
            payload = json_document(size)
            packed = (z.compress(payload) + z.flush(zlib.Z_SYNC_FLUSH))[:-4]
            self.echo_frame = client_frame(2, packed, rsv1=True)
        conns = self.open_conns()[:connections]
        self.echo_messages = 0
        start = time.monotonic()
        self.echo_until = start + seconds
        for fd, c in conns:
            c.echo = True
            self.write(fd, c, self.echo_frame)
        self.run_until(lambda: not any(c.echo for _, c in conns), seconds + 30)
        return {"messages": self.echo_messages, "seconds": time.monotonic() - start}

    def cmd_close(self, timeout: float) -> dict[str, Any]:
        frame = client_frame(8, (1000).to_bytes(2, "big"))
        total = len(self.conns)
        for fd, c in list(self.conns.items()):
            if c.state == OPEN:
                c.state = CLOSING
                self.write(fd, c, frame)
        self.run_until(lambda: not self.conns, timeout)
        left = len(self.conns)
        for fd, c in list(self.conns.items()):
            self.drop(fd, c, expected=True)
        return {"closed_by_server": total - left, "forced": left}

    def serve(self) -> None:
        """serve reads commands from stdin until it closes; answers one JSON line each."""
        os.set_blocking(0, False)
        self.ep.register(0, select.EPOLLIN)
        pending = b""
        while True:
            events = self.ep.poll(1.0)
            for fd, _ in events:
                if fd != 0:
                    continue
                chunk = os.read(0, 65536)
                if not chunk:
                    return
                pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                cmd = json.loads(line)
                name = cmd.pop("cmd")
                if name == "exit":
                    return
                reply = getattr(self, "cmd_" + name)(**cmd)
                sys.stdout.write(json.dumps(reply) + "\n")
                sys.stdout.flush()
            self.service([e for e in events if e[0] != 0])

    def service(self, events: list[tuple[int, int]]) -> None:
        for fd, ev in events:
            conn = self.conns.get(fd)
            if conn is None:
                continue
            if ev & select.EPOLLOUT:
                self.on_writable(fd, conn)
            if fd in self.conns and ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                self.on_readable(fd, conn)


_next_source = 0


class LoadClients:
    """LoadClients starts worker processes and runs each command on all of them at once."""

    def __init__(
        self,
        host: str,
        port: int,
        total: int,
        *,
        per_worker: int = 10_000,
        min_workers: int = 2,
        deflate: bool = False,
        first_source: int | None = None,
        engine: str = "python",
    ) -> None:
        global _next_source
        if engine not in ENGINES:
            raise ValueError(f"unknown load-client engine {engine!r} (one of {ENGINES})")
        if engine == "c" and deflate:
            raise ValueError(
                "the C load client does not offer permessage-deflate: use engine='python'"
            )
        self.engine = engine
        program = [c_worker()] if engine == "c" else [sys.executable, os.path.abspath(__file__)]
        count = max(min_workers, -(-total // per_worker))
        self.counts = [total // count + (1 if i < total % count else 0) for i in range(count)]
        spans = [max(1, -(-n // SOURCE_SPAN)) for n in self.counts]
        if first_source is None:
            # Fresh source addresses for every client group in this run: no 4-tuple left in
            # TIME_WAIT by an earlier group can collide with a new connection.
            first_source = _next_source
            _next_source = (first_source + sum(spans)) % 60_000
        self.procs: list[subprocess.Popen[bytes]] = []
        for i in range(count):
            args = [
                *program,
                "--host",
                host,
                "--port",
                str(port),
                "--sources",
                ",".join(
                    source_address(first_source + sum(spans[:i]) + j) for j in range(spans[i])
                ),
                "--user-base",
                str((1 << 40) + i * 1_000_000),
            ]
            if deflate:
                args.append("--deflate")
            self.procs.append(subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE))

    def command(self, per_worker: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """command sends one command to every worker, then collects every reply."""
        self.begin(per_worker)
        return self.finish()

    def begin(self, per_worker: Sequence[dict[str, Any]]) -> None:
        """begin sends one command to every worker without waiting (finish() collects the
        replies): for a command that must be running before the server acts."""
        for cmd in per_worker:
            if self.engine == "c" and cmd["cmd"] not in C_COMMANDS:
                raise NotImplementedError(
                    f"the C load client has no {cmd['cmd']!r} command (only "
                    f"{', '.join(C_COMMANDS)}): use LoadClients(..., engine='python')"
                )
        for proc, cmd in zip(self.procs, per_worker, strict=True):
            assert proc.stdin is not None
            proc.stdin.write((json.dumps(cmd) + "\n").encode())
            proc.stdin.flush()

    def finish(self) -> list[dict[str, Any]]:
        """finish collects every worker's reply to the command begin() sent."""
        replies = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"load client {proc.pid} died (exit {proc.wait()})")
            replies.append(json.loads(line))
        return replies

    def all(self, **cmd: Any) -> list[dict[str, Any]]:
        """all sends the same command to every worker."""
        return self.command([dict(cmd)] * len(self.procs))

    def open(self, window: int = 128, timeout: float = 180.0) -> dict[str, Any]:
        """open opens the connections (window = total handshakes in flight)."""
        each = max(1, window // len(self.procs))
        replies = self.command(
            [{"cmd": "open", "count": n, "window": each, "timeout": timeout} for n in self.counts]
        )
        return {
            "opened": sum(r["opened"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "deflated": sum(r["deflated"] for r in replies),
            "seconds": max(r["seconds"] for r in replies),
        }

    def ping(self, timeout: float = 60.0) -> dict[str, int]:
        """ping sends a ping on every open connection; returns how many answered."""
        replies = self.all(cmd="ping", timeout=timeout)
        return {k: sum(r[k] for r in replies) for k in ("asked", "answered", "lost")}

    def reset(self) -> dict[str, int]:
        """reset zeroes the frame counters; returns the connections open."""
        replies = self.all(cmd="reset")
        return {k: sum(r[k] for r in replies) for k in ("open", "lost")}

    def wait_frames(self, per_conn: int, timeout: float = 120.0) -> dict[str, Any]:
        """wait_frames waits until every connection has per_conn more data frames."""
        replies = self.all(cmd="wait_frames", per_conn=per_conn, timeout=timeout)
        return {
            "frames": sum(r["frames"] for r in replies),
            "target": sum(r["target"] for r in replies),
            "ok": all(r["ok"] for r in replies),
        }

    def echo(self, size: int, seconds: float, connections: int) -> dict[str, Any]:
        """echo runs request/response echo on ``connections`` connections for ``seconds``."""
        each = [connections // len(self.procs)] * len(self.procs)
        each[0] += connections - sum(each)
        replies = self.command(
            [{"cmd": "echo", "size": size, "seconds": seconds, "connections": n} for n in each]
        )
        return {
            "messages": sum(r["messages"] for r in replies),
            "seconds": max(r["seconds"] for r in replies),
        }

    def close(self, timeout: float = 60.0) -> dict[str, int]:
        """close closes every connection (close frame, then wait for the server)."""
        replies = self.all(cmd="close", timeout=timeout)
        return {k: sum(r[k] for r in replies) for k in ("closed_by_server", "forced")}

    def stop(self) -> None:
        """stop ends the workers (closing stdin ends them; kill by PID after a grace period)."""
        for proc in self.procs:
            if proc.stdin:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()  # still busy in a command: its PID, after one shared grace period
                proc.wait()

    def __enter__(self) -> LoadClients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ControlClient:
    """ControlClient is a blocking WebSocket client on ``/control`` that triggers fan-out."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=120)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(upgrade_request(host, port, "/control", key, False))
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0] + b" ":
            raise RuntimeError(f"control connection refused: {head[:80]!r}")

    def recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise RuntimeError("control connection closed by the server")
        return data

    def publish(self, count: int, size: int, kind: str = "") -> int:
        """publish asks for ``count`` messages of ``size`` bytes (kind: "", "json" or
        "json z", see servers/common.py); returns frames written."""
        self.sock.sendall(client_frame(1, f"!publish {count} {size} {kind}".strip().encode()))
        while True:
            while len(self.buf) < 2 or len(self.buf) < 2 + (self.buf[1] & 0x7F):
                self.buf += self.recv()
            opcode, length = self.buf[0] & 0x0F, self.buf[1] & 0x7F
            payload, self.buf = self.buf[2 : 2 + length], self.buf[2 + length :]
            if opcode == 9:
                self.sock.sendall(client_frame(10, payload))
            elif opcode == 1 and payload.startswith(b"done "):
                return int(payload[5:])

    def close(self) -> None:
        """close drops the control connection."""
        self.sock.close()


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="one load-client worker (see the module docstring)")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sources", required=True, help="comma-separated source addresses")
    p.add_argument("--user-base", type=int, default=1 << 40)
    p.add_argument("--deflate", action="store_true")
    a = p.parse_args()
    try:
        Worker(a.host, a.port, a.sources.split(","), a.user_base, a.deflate).serve()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
