"""tls: what TLS costs a gateway: lowmemws (its own TLS 1.3 record layer after an OpenSSL
handshake) beside websockets with an ssl context (Python's ssl module, OpenSSL), in one run.

For each server: a fresh process serving TLS with a test certificate made for the run (openssl
command line, P-256), pings off (the load clients do not answer them); RSS after start, after a
warm-up (500 TLS connections opened and closed: the handshake's working set is in the heap),
with N idle TLS 1.3 connections open (settled), and after they closed (settled). Bytes per idle
connection = (idle - warm) / N. Server CPU (utime + stime of its process) per handshake +
upgrade while the N open, and per echoed message while every connection echoes ROUNDS 64-byte
messages. The clients are tlsclient.py processes (Python ssl), one per source address.

    python benchmarks/tls.py --connections 19000 [--servers lowmemws,websockets] [--tls-version 1.2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import procstats
import report
from serverctl import Server, version

HERE = Path(__file__).resolve().parent
WARMUP_CONNECTIONS = 500
PER_CLIENT = 4_000


def make_certificate(directory: Path) -> tuple[str, str]:
    """make_certificate writes a self-signed P-256 certificate and key for 127.0.0.1."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=bench",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


class Clients:
    """Clients: tlsclient.py processes holding connections, driven by one command at a time."""

    def __init__(self, host: str, port: int, connections: int, tls_version: str = "1.3") -> None:
        self.procs: list[subprocess.Popen[str]] = []
        left, i = connections, 0
        while left > 0:
            n = min(PER_CLIENT, left)
            argv = [sys.executable, str(HERE / "tlsclient.py"), host, str(port), str(n),
                    f"127.0.0.{2 + i}", tls_version]  # fmt: skip
            self.procs.append(
                subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
            left -= n
            i += 1

    def command(self, line: str) -> list[dict[str, Any]]:
        """command runs line on every client at once; returns their replies."""
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(line + "\n")
            p.stdin.flush()
        replies = []
        for p in self.procs:
            assert p.stdout is not None
            reply = p.stdout.readline()
            if not reply:
                raise RuntimeError(f"a TLS load client died during {line!r}")
            replies.append(json.loads(reply))
        return replies

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in self.procs:
            p.wait(60)


def measure(
    name: str, connections: int, rounds: int, cert: str, key: str, tls_version: str
) -> dict[str, Any]:
    """measure runs the experiment of the module docstring on one server."""
    extra = ("--certfile", cert, "--keyfile", key, "--ping-interval", "0")
    with Server(name, extra=extra) as srv:
        time.sleep(0.5)
        raw = procstats.settled_memory(srv.pid, timeout=10)
        with Clients(srv.host, srv.port, WARMUP_CONNECTIONS, tls_version) as warmup:
            warmup.command("open")
            warmup.command("close")
        warm = procstats.settled_memory(srv.pid, timeout=15)
        with Clients(srv.host, srv.port, connections, tls_version) as clients:
            cpu0 = procstats.tree_cpu_ticks(srv.pid)
            opened = sum(r["opened"] for r in clients.command("open"))
            cpu1 = procstats.tree_cpu_ticks(srv.pid)
            idle = procstats.settled_memory(srv.pid, timeout=60)
            echoed = sum(r["echoed"] for r in clients.command(f"echo {rounds}"))
            cpu2 = procstats.tree_cpu_ticks(srv.pid)
            clients.command("close")
        after = procstats.settled_memory(srv.pid, timeout=30)
    n = max(1, opened)
    return {
        "server": name,
        "version": version(name),
        "tls_version": tls_version,
        "connections": opened,
        "rss_raw": raw["rss"],
        "rss_warm": warm["rss"],
        "rss_idle": idle["rss"],
        "rss_after": after["rss"],
        "bytes_per_conn": (idle["rss"] - warm["rss"]) / n,
        "handshake_cpu_us": procstats.ticks_to_us(cpu1 - cpu0) / n,
        "echoed": echoed,
        "echo_cpu_us": procstats.ticks_to_us(cpu2 - cpu1) / max(1, echoed),
    }


def run(
    servers: list[str], connections: int, rounds: int, tls_version: str, log: Any = print
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lowmemws-tls-bench-") as tmp:
        cert, key = make_certificate(Path(tmp))

        def one(name: str) -> dict[str, Any]:
            log(f"  {name}: {connections:,} TLS connections, {rounds} echo rounds")
            return measure(name, connections, rounds, cert, key, tls_version)

        rows, skipped = report.each_server(servers, one, log)
    return {
        "connections": connections,
        "rounds": rounds,
        "tls_version": tls_version,
        "rows": rows,
        "skipped": skipped,
    }


def render(result: dict[str, Any]) -> str:
    def mib(n: float) -> str:
        return f"{n / 1048576:.1f}"

    rows = [
        [
            f"{r['server']} {r['version']} (TLS {r.get('tls_version', '1.3')})",
            f"{r['connections']:,}",
            f"{r['bytes_per_conn']:,.0f}",
            f"{mib(r['rss_raw'])} / {mib(r['rss_warm'])} / {mib(r['rss_idle'])} / "
            f"{mib(r['rss_after'])}",
            f"{r['handshake_cpu_us']:,.0f}",
            f"{r['echo_cpu_us']:,.1f}",
            f"{r['echoed']:,}",
        ]
        for r in result["rows"]
    ]
    headers = [
        "server",
        "conns",
        "bytes/idle conn",
        "RSS MiB raw / warm / idle / after",
        "server CPU us per handshake + upgrade",
        "server CPU us per echo",
        "echoed",
    ]
    return report.table(headers, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = report.parser(__doc__)
    p.add_argument("--connections", type=int, default=19_000)
    p.add_argument("--rounds", type=int, default=5, help="echo rounds over every connection")
    p.add_argument("--servers", default="lowmemws,websockets")
    p.add_argument("--tls-version", choices=("1.3", "1.2"), default="1.3", help="clients' TLS")
    return report.main(p, argv, run_args, render)


def run_args(a: argparse.Namespace) -> dict[str, Any]:
    if a.connections > 19_000:
        sys.exit("at most 19,000 connections: one server process has 20,000 file descriptors")
    return run(a.servers.split(","), a.connections, a.rounds, a.tls_version)


if __name__ == "__main__":
    main()
