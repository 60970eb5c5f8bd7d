"""ping_crowd: many idle WebSocket clients held by one child process that answer pings late.

Started by tests/support/overload.py (CrowdProcess), never by pytest itself, so that the
clients keep answering on time whatever the test process does. It imports the standard
library only. One epoll loop drives every socket:

- it opens ``--clients`` raw TCP connections to ``--host:--port``, at once or at an even
  pace over ``--spread`` seconds, spread over the source addresses 127.0.0.2 .. 127.0.0.9
  (each has its own ephemeral ports), upgrades them and records when each 101 arrived;
- it answers every server ping with a pong exactly ``--pong-delay`` seconds after the ping
  arrived, and records per connection: ping arrival times, pong send times, the close
  frame's code and time, and the time of EOF (or reset);
- it can fire one action at the moment a ping round has reached (nearly) all connections:
  ``stall`` completes a pre-sent ``POST /stall`` request (the server's loop then sleeps), or
  ``sigstop`` stops the server process and continues it ``seconds`` later.

Protocol: commands arrive on standard input as one JSON object per line, events leave on
standard output the same way (``{"event": ...}``). Times are ``time.monotonic()`` seconds,
which is the same clock (CLOCK_MONOTONIC) in every process of the machine.

Commands:

- ``{"cmd": "sync"}``: send a client ping on every open connection, so the server sees them
  all active within a few milliseconds (its next ping round then reaches them together);
  answered with ``synced``;
- ``{"cmd": "arm", "fraction": F, "timeout": T, "action": "none"|"stall"|"sigstop",
  "seconds": S, "pid": P, "path": "/stall?seconds=S", "burst": B}``: from now on, count the
  open connections that received a ping; once that is at least F of them (or, with B true,
  once a burst has reached BURST_SHARE of them, see below), fire the action and report
  ``fired`` (``not_fired`` after T seconds); the stall or stop ending is reported as
  ``action_done``;
- ``{"cmd": "report"}``: answered with ``report``: a summary and every connection's record;
- ``{"cmd": "quit"}`` (or EOF on standard input): close everything and exit.

The process always ends: after ``--lifetime`` seconds it exits by itself, and a server it
stopped is always continued (SIGCONT) before it exits.
"""

from __future__ import annotations

import argparse
import base64
import errno
import heapq
import json
import math
import os
import select
import signal
import socket
import struct
import sys
import time
from typing import Any

SOURCES = tuple(f"127.0.0.{host}" for host in range(2, 10))
#: Linux IP_BIND_ADDRESS_NO_PORT: bind the address only, pick the port at connect time.
IP_BIND_ADDRESS_NO_PORT = 24
PINGS_KEPT = 64  # ping and pong times kept per connection
UPGRADE_TIMEOUT = 30.0
#: With "burst", a ping round also counts as reached once BURST_SHARE of the connections got
#: a ping within BURST_WINDOW seconds of its first ping: a round that arrives in such a burst
#: was written by the server in one go (the rest is on its way), and firing then, before the
#: first pongs are due, keeps every pong of the round pending on a loaded machine too.
BURST_SHARE = 0.25
BURST_WINDOW = 0.025

CONNECTING, UPGRADING, OPEN, GONE = range(4)


def masked(opcode: int, payload: bytes = b"") -> bytes:
    """masked is one final client frame with a small payload (< 126 bytes), masked."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


class Conn:
    """Conn is one client connection and what it saw."""

    __slots__ = (
        "sock",
        "state",
        "buf",
        "out",
        "up",
        "pings",
        "pongs",
        "ping_count",
        "close_code",
        "close_t",
        "eof_t",
        "armed_at",
        "error",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.state = CONNECTING
        self.buf = b""
        self.out = b""
        self.up: float | None = None
        self.pings: list[float] = []
        self.pongs: list[float] = []
        self.ping_count = 0
        self.close_code: int | None = None
        self.close_t: float | None = None
        self.eof_t: float | None = None
        self.armed_at = 0
        self.error: str | None = None

    def record(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "pings": self.pings,
            "pongs": self.pongs,
            "ping_count": self.ping_count,
            "close": self.close_code,
            "close_t": self.close_t,
            "eof": self.eof_t,
            "error": self.error,
        }


class PingCrowd:
    """PingCrowd is the crowd's state and its epoll loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.host: str = args.host
        self.port: int = args.port
        self.pong_delay: float = args.pong_delay
        self.end = time.monotonic() + args.lifetime
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.timers: list[tuple[float, int, str, int]] = []
        self.payloads: dict[int, bytes] = {}
        self.pongs = 0
        self.seq = 0
        self.quit = False
        self.stdin_buf = b""
        self.stdin_fd = sys.stdin.fileno()
        os.set_blocking(self.stdin_fd, False)
        self.ep.register(self.stdin_fd, select.EPOLLIN)
        self.upgrading = 0
        self.upgrade_deadline = 0.0
        self.trigger: dict[str, Any] | None = None
        self.reached = 0
        self.stall_sock: socket.socket | None = None
        self.stall_buf = b""
        self.stall_fired = 0.0
        self.stopped_pid = 0
        self.clients: int = args.clients
        self.to_open: int = args.clients
        self.spread: float = args.spread
        self.started = time.monotonic()
        self.upgrade_deadline = self.started + args.spread + UPGRADE_TIMEOUT
        self.open_due(self.started)

    # ---------------------------------------------------------------- output

    @staticmethod
    def emit(event: str, **fields: Any) -> None:
        fields["event"] = event
        fields.setdefault("t", time.monotonic())
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    # ---------------------------------------------------------------- connections

    def open_due(self, now: float) -> None:
        """open_due opens the connections due by now: all at once without --spread, else
        at an even pace over the spread."""
        if not self.to_open:
            return
        if self.spread > 0:
            share = min(1.0, (now - self.started) / self.spread)
            due = math.ceil(self.clients * share) - (self.clients - self.to_open)
        else:
            due = self.to_open
        for _ in range(max(0, due)):
            i = self.clients - self.to_open
            self.to_open -= 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.setblocking(False)
            sock.bind((SOURCES[i % len(SOURCES)], 0))
            code = sock.connect_ex((self.host, self.port))
            conn = Conn(sock)
            self.conns[sock.fileno()] = conn
            self.upgrading += 1
            if code not in (0, errno.EINPROGRESS):
                self.gone(conn, f"connect: {errno.errorcode.get(code, code)}")
                continue
            self.ep.register(sock.fileno(), select.EPOLLOUT)
        self.check_upgraded()

    def head(self) -> bytes:
        key = base64.b64encode(os.urandom(16)).decode()
        return (
            f"GET /crowd HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()

    def gone(self, conn: Conn, error: str | None = None) -> None:
        """gone ends a connection that was closed, reset or failed."""
        if conn.state == GONE:
            return
        if conn.state in (CONNECTING, UPGRADING):
            self.upgrading -= 1
        if error and conn.error is None:
            conn.error = error
        conn.state = GONE
        fd = conn.sock.fileno()
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass
        conn.sock.close()

    def check_upgraded(self) -> None:
        if self.upgrading == 0 and self.to_open == 0 and self.upgrade_deadline:
            self.upgrade_deadline = 0.0
            ups = [c.up for c in self.conns.values() if c.up is not None]
            self.emit(
                "upgraded",
                open=sum(1 for c in self.conns.values() if c.state == OPEN),
                failed=sum(1 for c in self.conns.values() if c.up is None),
                errors=sorted({c.error for c in self.conns.values() if c.error})[:5],
                first=min(ups) if ups else None,
                last=max(ups) if ups else None,
            )

    def send(self, conn: Conn, data: bytes) -> None:
        if conn.state == GONE:
            return
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.on_eof(conn, f"send: {exc}")
            return
        if sent < len(data):
            conn.out = data[sent:]
            self.ep.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def on_writable(self, conn: Conn) -> None:
        if conn.state == CONNECTING:
            code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.gone(conn, f"connect: {errno.errorcode.get(code, code)}")
                return
            conn.state = UPGRADING
            self.ep.modify(conn.sock.fileno(), select.EPOLLIN)
            self.send(conn, self.head())
            return
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except BlockingIOError:
                return
            except OSError as exc:
                self.on_eof(conn, f"send: {exc}")
                return
            conn.out = conn.out[sent:]
        if not conn.out and conn.state != GONE:
            self.ep.modify(conn.sock.fileno(), select.EPOLLIN)

    def on_readable(self, conn: Conn, now: float) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:  # a reset ends the connection like EOF does
            self.on_eof(conn, f"recv: {exc}")
            return
        if not data:
            self.on_eof(conn, None)
            return
        conn.buf += data
        if conn.state == UPGRADING:
            end = conn.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not conn.buf.startswith(b"HTTP/1.1 101 "):
                self.gone(conn, "refused: " + conn.buf[:40].decode("latin-1"))
                self.check_upgraded()
                return
            conn.buf = conn.buf[end + 4 :]
            conn.state = OPEN
            conn.up = now
            self.upgrading -= 1
            self.check_upgraded()
        self.parse_frames(conn, now)

    def on_eof(self, conn: Conn, error: str | None) -> None:
        if conn.eof_t is None:
            conn.eof_t = time.monotonic()
        was_open = conn.state == OPEN
        self.gone(conn, error)
        if not was_open:
            self.check_upgraded()

    def parse_frames(self, conn: Conn, now: float) -> None:
        buf = conn.buf
        while len(buf) >= 2 and conn.close_t is None:
            b0, b1 = buf[0], buf[1]
            n, at = b1 & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, at = struct.unpack("!H", buf[2:4])[0], 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, at = struct.unpack("!Q", buf[2:10])[0], 10
            if len(buf) < at + n:
                break
            payload = buf[at : at + n]
            buf = buf[at + n :]
            opcode = b0 & 0x0F
            if opcode == 9:
                self.on_ping(conn, now, payload)
            elif opcode == 8:  # answer it; the connection then only waits for EOF
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                conn.close_code, conn.close_t = code, now
                self.send(conn, masked(8, payload[:2]))
        conn.buf = b"" if conn.close_t is not None else buf

    def on_ping(self, conn: Conn, now: float, payload: bytes) -> None:
        conn.ping_count += 1
        if len(conn.pings) < PINGS_KEPT:
            conn.pings.append(now)
        self.push_timer(now + self.pong_delay, "pong", conn.sock.fileno(), payload)
        trigger = self.trigger
        if trigger is not None and not trigger["done"] and conn.ping_count == conn.armed_at + 1:
            self.reached += 1
            if self.reached == 1:
                trigger["first"] = now
            if self.reached >= trigger["need"]:
                self.fire(now, "nearly all")
            elif self.reached >= trigger["burst_need"] and now - trigger["first"] <= BURST_WINDOW:
                self.fire(now, "burst")

    # ---------------------------------------------------------------- timers

    def push_timer(self, due: float, kind: str, fd: int, payload: bytes = b"") -> None:
        self.seq += 1
        heapq.heappush(self.timers, (due, self.seq, kind, fd))
        if payload:  # server pings carry no payload; keep one if one ever does
            self.payloads[self.seq] = payload

    def run_timers(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            _, seq, kind, fd = heapq.heappop(self.timers)
            payload = self.payloads.pop(seq, b"")
            if kind == "pong":
                conn = self.conns.get(fd)
                if conn is not None and conn.state == OPEN and conn.close_t is None:
                    self.send(conn, masked(10, payload))
                    self.pongs += 1
                    if len(conn.pongs) < PINGS_KEPT:
                        conn.pongs.append(now)
            elif kind == "sigcont":
                self.continue_server()

    # ---------------------------------------------------------------- commands

    def on_stdin(self) -> None:
        try:
            data = os.read(self.stdin_fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self.quit = True
            return
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            if line.strip():
                self.command(json.loads(line))

    def open_conns(self) -> list[Conn]:
        return [c for c in self.conns.values() if c.state == OPEN and c.close_t is None]

    def command(self, cmd: dict[str, Any]) -> None:
        name = cmd.get("cmd")
        if name == "sync":
            for conn in self.open_conns():
                self.send(conn, masked(9))
            self.emit("synced")
        elif name == "arm":
            self.arm(cmd)
        elif name == "report":
            self.report()
        elif name == "quit":
            self.quit = True
        else:
            self.emit("error", message=f"unknown command {name!r}")

    def arm(self, cmd: dict[str, Any]) -> None:
        conns = self.open_conns()
        for conn in self.conns.values():
            conn.armed_at = conn.ping_count
        need = max(1, math.ceil(float(cmd.get("fraction", 0.99)) * len(conns)))
        self.trigger = {
            "need": need,
            "burst_need": (
                max(1, math.ceil(BURST_SHARE * len(conns))) if cmd.get("burst") else need + 1
            ),
            "done": False,
            "deadline": time.monotonic() + float(cmd.get("timeout", 20.0)),
            "action": cmd.get("action", "none"),
            "seconds": float(cmd.get("seconds", 0.0)),
            "pid": int(cmd.get("pid", 0)),
        }
        self.reached = 0
        self.trigger["pongs"] = self.pongs
        if self.trigger["action"] == "stall":
            path = str(cmd.get("path", "/stall?seconds=1"))
            sock = socket.create_connection((self.host, self.port), timeout=5)
            sock.setblocking(False)
            # all of the request but its last CRLF: that one byte pair fires the stall
            sock.send(
                f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: 0\r\n".encode()
            )
            self.stall_sock = sock
            self.ep.register(sock.fileno(), select.EPOLLIN)
        self.emit("armed", need=need, open=len(conns))

    def fire(self, now: float, rule: str) -> None:
        trigger = self.trigger
        assert trigger is not None
        trigger["done"] = True
        action = trigger["action"]
        if action == "stall" and self.stall_sock is not None:
            self.stall_sock.send(b"\r\n")
            self.stall_fired = now
        elif action == "sigstop":
            self.stopped_pid = trigger["pid"]
            os.kill(self.stopped_pid, signal.SIGSTOP)
            self.push_timer(time.monotonic() + trigger["seconds"], "sigcont", 0)
        self.emit(
            "fired",
            reached=self.reached,
            need=trigger["need"],
            action=action,
            rule=rule,
            first=trigger.get("first"),
            pongs=self.pongs - trigger["pongs"],
        )
        if action == "none":
            self.emit("action_done", action=action)

    def continue_server(self) -> None:
        if self.stopped_pid:
            pid, self.stopped_pid = self.stopped_pid, 0
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.emit("action_done", action="sigstop")

    def on_stall_answer(self) -> None:
        assert self.stall_sock is not None
        try:
            data = self.stall_sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.stall_buf += data
        head, sep, body = self.stall_buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if data and not (sep and len(body) >= length):
            return
        parts = self.stall_buf.split(b" ", 2)
        status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
        self.ep.unregister(self.stall_sock.fileno())
        self.stall_sock.close()
        self.stall_sock = None
        self.emit(
            "action_done",
            action="stall",
            status=status,
            fired=self.stall_fired,
            body=body.decode("latin-1"),
        )

    def report(self) -> None:
        records = [c.record() for c in self.conns.values()]
        upgraded = [c for c in self.conns.values() if c.up is not None]
        codes: dict[str, int] = {}
        for c in upgraded:
            if c.close_code is not None:
                codes[str(c.close_code)] = codes.get(str(c.close_code), 0) + 1
        self.emit(
            "report",
            clients=len(self.conns),
            upgraded=len(upgraded),
            open=sum(1 for c in upgraded if c.close_t is None and c.eof_t is None),
            close_frames=codes,
            eof=sum(1 for c in upgraded if c.eof_t is not None),
            eof_without_close=sum(1 for c in upgraded if c.eof_t is not None and c.close_t is None),
            conns=records,
        )

    # ---------------------------------------------------------------- loop

    def run(self) -> None:
        try:
            while not self.quit:
                now = time.monotonic()
                if now > self.end:
                    self.emit("lifetime_over")
                    break
                self.open_due(now)
                wait = 0.01 if self.to_open else 0.1
                if self.timers:
                    wait = min(wait, max(self.timers[0][0] - now, 0.0))
                for fd, mask in self.ep.poll(wait, 8192):
                    now = time.monotonic()
                    if fd == self.stdin_fd:
                        self.on_stdin()
                        continue
                    if self.stall_sock is not None and fd == self.stall_sock.fileno():
                        self.on_stall_answer()
                        continue
                    conn = self.conns.get(fd)
                    if conn is None or conn.state == GONE:
                        continue
                    if mask & select.EPOLLOUT:
                        self.on_writable(conn)
                    if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        if conn.state != CONNECTING and conn.state != GONE:
                            self.on_readable(conn, now)
                now = time.monotonic()
                self.run_timers(now)
                self.check_deadlines(now)
        finally:
            self.continue_server()
            for conn in self.conns.values():
                if conn.state != GONE:
                    conn.sock.close()

    def check_deadlines(self, now: float) -> None:
        if self.upgrade_deadline and now > self.upgrade_deadline:
            for conn in self.conns.values():
                if conn.state in (CONNECTING, UPGRADING):
                    self.gone(conn, "upgrade timed out")
            self.check_upgraded()
        trigger = self.trigger
        if trigger is not None and not trigger["done"] and now > trigger["deadline"]:
            trigger["done"] = True
            self.emit("not_fired", reached=self.reached, need=trigger["need"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--pong-delay", type=float, default=0.05)
    parser.add_argument("--spread", type=float, default=0.0, help="open clients over this long")
    parser.add_argument("--lifetime", type=float, default=120.0, help="exit after this long")
    args = parser.parse_args()
    PingCrowd(args).run()


if __name__ == "__main__":
    main()
