"""demo_memory: bytes of RSS per idle connection of the mailnotify demo (examples/mailnotify.py).

The demo runs as one process. Every connection is a different, authenticated user (a query
token), so it carries its own 64-bit user tag and got its hello. Like idle_memory.py: RSS after
start ("raw"), after a warm-up of a few hundred connections opened and closed ("warm"), with N
idle connections once RSS settles ("idle"), and after they all close ("after");
bytes per idle connection = (idle - warm) / N.

Clients are separate processes of this script (``--client``), each with its own loopback
source address, doing blocking handshakes one after another: simple, and cheap enough here.

    python benchmarks/demo_memory.py [--connections 19000] [--envelope]

``--envelope``: every client offers the subprotocol lowmemws.v1 with ``lmw_resume={}`` (as
lowmemws.js does), so each connection goes through the gateway's resume (a baseline
position for its user stream) before it idles; it waits for ``{"synced":true}``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import procstats
from serverctl import free_port

DEMO = Path(__file__).resolve().parents[1] / "examples" / "mailnotify.py"
SECRET = "demo-memory"
PER_CLIENT = 9_000
WARMUP = 500


ENVELOPE_HEADERS = "Sec-WebSocket-Protocol: lowmemws.v1\r\n"
RESUME_QUERY = "&lmw_resume=%7B%7D"


def open_connections(
    port: int, source: str, first: int, count: int, envelope: bool = False
) -> list[socket.socket]:
    """open_connections opens count authenticated connections and reads each one's hello
    (with envelope: until the gateway's synced frame)."""
    socks = []
    extra_query, extra_headers = (RESUME_QUERY, ENVELOPE_HEADERS) if envelope else ("", "")
    marker = b'"synced"' if envelope else b'"hello"'
    for i in range(first, first + count):
        user = f"user{i}"
        token = hmac.new(SECRET.encode(), user.encode(), hashlib.sha256).hexdigest()
        key = base64.b64encode(os.urandom(16)).decode()
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
        sock.sendall(
            f"GET /ws?user={user}&token={token}{extra_query} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"{extra_headers}Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        answer = b""
        while marker not in answer:
            chunk = sock.recv(4096)
            if not chunk or (answer + chunk)[:12] != b"HTTP/1.1 101"[: len(answer + chunk)]:
                raise SystemExit(f"connection {i} refused: {(answer + chunk)[:60]!r}")
            answer += chunk
        socks.append(sock)
    return socks


def client_main(port: int, source: str, first: int, count: int, envelope: bool) -> None:
    """client_main holds its connections until its stdin closes (or says "close")."""
    socks = open_connections(port, source, first, count, envelope)
    print(len(socks), flush=True)
    sys.stdin.readline()
    for sock in socks:
        sock.close()


class Clients:
    """Clients opens connections from client processes and closes them on demand."""

    def __init__(
        self, port: int, total: int, first_user: int, first_source: int, envelope: bool
    ) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        start, n = first_user, 0
        while n < total:
            count = min(PER_CLIENT, total - n)
            source = f"127.0.{first_source // 250}.{2 + first_source % 250}"
            first_source += 1
            args = [sys.executable, __file__, "--client", str(port), source, str(start), str(count)]
            args += ["envelope"] if envelope else []
            self.procs.append(
                subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
            start, n = start + count, n + count

    def wait_open(self) -> int:
        opened = 0
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a client failed (exit {proc.wait()})")
            opened += int(line)
        return opened

    def close(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(60)


def settled(pid: int, timeout: float = 30.0) -> int:
    return procstats.settled_memory(pid, timeout)["rss"]


def measure(connections: int, envelope: bool = False) -> dict[str, float]:
    port = free_port()
    argv = [sys.executable, str(DEMO), "--port", str(port), "--secret", SECRET]
    demo = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            if line.startswith("listening on http://"):
                break
        raw = settled(demo.pid, 10)
        warm_up = Clients(port, WARMUP, 10_000_000, 100, envelope)
        warm_up.wait_open()
        warm_up.close()
        warm = settled(demo.pid, 15)
        clients = Clients(port, connections, 0, 0, envelope)
        started = time.monotonic()
        opened = clients.wait_open()
        seconds = time.monotonic() - started
        idle = settled(demo.pid, 30)
        clients.close()
        after = settled(demo.pid, 30)
    finally:
        demo.terminate()
        demo.wait(30)
    return {
        "connections": opened,
        "open_seconds": seconds,
        "rss_raw": raw,
        "rss_warm": warm,
        "rss_idle": idle,
        "rss_after": after,
        "bytes_per_conn": (idle - warm) / opened,
        "bytes_per_conn_raw": (idle - raw) / opened,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        port, source, first, count = sys.argv[2:6]
        client_main(int(port), source, int(first), int(count), sys.argv[6:7] == ["envelope"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=19_000)
    parser.add_argument("--envelope", action="store_true", help="clients use lowmemws.v1")
    args = parser.parse_args()
    r = measure(args.connections, args.envelope)
    mib = 1024 * 1024
    print(
        f"mailnotify demo (history on), one process, {r['connections']:,} idle authenticated "
        f"connections{' (lowmemws.v1, resumed)' if args.envelope else ''} "
        f"(opened in {r['open_seconds']:.1f} s)\n"
        f"  RSS raw {r['rss_raw'] / mib:.1f} MiB, warm {r['rss_warm'] / mib:.1f} MiB, "
        f"idle {r['rss_idle'] / mib:.1f} MiB, after close {r['rss_after'] / mib:.1f} MiB\n"
        f"  bytes per idle connection: {r['bytes_per_conn']:.1f} "
        f"(against the raw start: {r['bytes_per_conn_raw']:.1f})"
    )


if __name__ == "__main__":
    main()
