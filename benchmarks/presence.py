"""presence: online() latency over 1, 2 and 4 Redis nodes, and a Publisher's tight loop.

A throw-away redis-server on a free loopback port; gateway nodes as separate processes
(``Gateway(bus=RedisBus(url))``), each holding ``--connections`` idle connections of distinct
str users plus one of "alice"; a `lowmemws.Publisher` in this process asks
``online("alice")`` ``--queries`` times one after another (each answer must be the number of
nodes) and reports the median and 99th percentile. Then the Publisher publishes
``--messages`` 64-byte messages to a topic nobody holds in a tight loop and flushes:
messages per second, and how many publishes were refused (must be 0: a full buffer waits).

    python benchmarks/presence.py [--nodes 1,2,4] [--queries 300] [--messages 100000]
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

import report
from serverctl import free_port

import lowmemws

NODE = textwrap.dedent(
    """
    import sys, threading
    import lowmemws

    port, url = int(sys.argv[1]), sys.argv[2]
    bus = lowmemws.RedisBus(url)
    gateway = lowmemws.Gateway("127.0.0.1", port, bus=bus)
    gateway.on_connect(lambda request: lowmemws.Accept(user=request.params["user"]))

    def announce():
        if gateway.wait_ready(30) and bus.wait_ready(30):
            print("ready", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    gateway.run()
    """
)


def upgrade(port: int, user: str) -> socket.socket:
    """upgrade opens one WebSocket connection as user and returns its socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"GET /?user={user} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    if not sock.recv(4096).startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"upgrade refused for {user}")
    return sock


class Redis:
    """Redis is a redis-server on a free port in a temporary directory, killed by its PID."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (make sysdeps)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="lmw-presence-")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self.proc = subprocess.Popen(args + ["--dir", self.dir], stdout=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        time.sleep(0.3)

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_node(url: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", NODE, str(port), url], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("a node did not start")
    return proc, port


def online_latency(url: str, nodes: int, connections: int, queries: int) -> dict[str, Any]:
    """online_latency measures online("alice") over nodes gateway processes."""
    procs, socks = [], []
    try:
        for n in range(nodes):
            proc, port = start_node(url)
            procs.append(proc)
            socks.append(upgrade(port, "alice"))
            socks += [upgrade(port, f"user-{n}-{i}") for i in range(connections)]
        with lowmemws.Publisher(url) as publisher:
            publisher.wait_ready(10)
            assert publisher.online("alice") == nodes  # warm: links up, every node subscribed
            took = []
            for _ in range(queries):
                start = time.perf_counter()
                count = publisher.online("alice")
                took.append(time.perf_counter() - start)
                assert count == nodes, count
        took.sort()
        return {
            "nodes": nodes,
            "queries": queries,
            "median_ms": statistics.median(took) * 1000,
            "p99_ms": took[int(len(took) * 0.99) - 1] * 1000,
        }
    finally:
        for sock in socks:
            sock.close()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)


def publisher_loop(url: str, messages: int) -> dict[str, Any]:
    """publisher_loop times messages publishes in a tight loop plus the flush."""
    payload = "x" * 64
    with lowmemws.Publisher(url) as publisher:
        publisher.wait_ready(10)
        start = time.perf_counter()
        for _ in range(messages):
            publisher.publish("nobody-listens", payload)
        publisher.flush(60)
        seconds = time.perf_counter() - start
        stats = publisher.bus.stats.snapshot()
    return {
        "messages": messages,
        "seconds": seconds,
        "per_second": messages / seconds,
        "refused": stats["refused"],
    }


def run_args(a: Any) -> dict[str, Any]:
    redis = Redis()
    try:
        rows = [
            online_latency(redis.url, int(n), a.connections, a.queries) for n in a.nodes.split(",")
        ]
        loop = publisher_loop(redis.url, a.messages)
    finally:
        redis.stop()
    return {"load": os.getloadavg(), "online": rows, "publisher": loop}


def render(result: dict[str, Any]) -> str:
    rows = [
        [r["nodes"], r["queries"], f"{r['median_ms']:.2f}", f"{r['p99_ms']:.2f}"]
        for r in result["online"]
    ]
    loop = result["publisher"]
    return (
        report.table(["nodes", "queries", "online() median ms", "p99 ms"], rows)
        + f"\n\nPublisher tight loop: {loop['messages']:,} messages in {loop['seconds']:.2f} s"
        + f" ({loop['per_second']:,.0f}/s), refused {loop['refused']}"
        + f"\nload average at the end: {result['load'][0]:.2f}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = report.parser(__doc__)
    p.add_argument("--nodes", default="1,2,4")
    p.add_argument("--connections", type=int, default=1000, help="idle connections per node")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--messages", type=int, default=100_000)
    return report.main(p, argv, run_args, render)


if __name__ == "__main__":
    main()
