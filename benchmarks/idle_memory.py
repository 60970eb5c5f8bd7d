"""idle_memory: user-space bytes per idle WebSocket connection, per server, in one run.

For each server: a fresh process; RSS and RssAnon (/proc/PID/status) right after start ("raw")
and after a warm-up (a few hundred connections opened, pinged and closed, so first-use
allocations such as lazily imported modules and grown tables are not charged to the idle
connections); then N connections from load-client processes are opened and left idle until RSS
settles ("idle"); then every connection is pinged (all must answer) and closed, and RSS is read
once more after it settles ("after"). Bytes per idle connection = (idle - warm) / N; the figure
against the raw baseline is reported too. Kernel memory (Slab, SUnreclaim from /proc/meminfo,
TCP buffer pages from /proc/net/sockstat) is reported separately: it covers both ends of every
loopback connection, since the load clients run on the same kernel.

    python benchmarks/idle_memory.py --connections 19000 [--servers a,b] [--deflate]
        [--user-ids int|str|long-str|uuid]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import procstats
import report
from loadclients import LoadClients
from serverctl import Server, version

WARMUP_CONNECTIONS = 500


def measure(
    name: str,
    connections: int,
    deflate: bool,
    log: Any = print,
    *,
    extra: tuple[str, ...] = (),
    label: str = "",
) -> dict[str, Any]:
    """measure runs the idle-memory experiment on one server (see the module docstring).

    ``extra`` is passed to the server script (a variant, such as auth_io.py's async
    on_connect: ``("--hook", "async")``); ``label`` names the variant in the log and the row.
    """
    with Server(name, extra=extra) as srv:
        time.sleep(0.5)
        raw = procstats.settled_memory(srv.pid, timeout=10)
        with LoadClients(srv.host, srv.port, WARMUP_CONNECTIONS, deflate=deflate) as lc:
            lc.open()
            lc.ping()
            lc.close()
        warm = procstats.settled_memory(srv.pid, timeout=15)
        kernel0 = procstats.kernel_memory()
        with LoadClients(srv.host, srv.port, connections, deflate=deflate) as lc:
            opened = lc.open()
            log(
                f"  {label or name}: {opened['opened']:,} open in {opened['seconds']:.1f} s;"
                " settling"
            )
            idle = procstats.settled_memory(srv.pid, timeout=60)
            kernel1 = procstats.kernel_memory()
            ping = lc.ping()
            closed = lc.close()
        after = procstats.settled_memory(srv.pid, timeout=30)
        alive = srv.alive()
    n = max(1, opened["opened"])
    return {
        "server": name,
        "version": version(name),
        "variant": label,
        "server_args": list(extra),
        "deflate_offered": deflate,
        "deflate_negotiated": opened["deflated"],
        "connections": opened["opened"],
        "wanted": connections,
        "open_seconds": opened["seconds"],
        "pinged": ping,
        "closed": closed,
        "server_alive": alive,
        "rss_raw": raw["rss"],
        "rss_warm": warm["rss"],
        "rss_idle": idle["rss"],
        "rss_after": after["rss"],
        "anon_raw": raw["rss_anon"],
        "anon_warm": warm["rss_anon"],
        "anon_idle": idle["rss_anon"],
        "anon_after": after["rss_anon"],
        "bytes_per_conn": (idle["rss"] - warm["rss"]) / n,
        "bytes_per_conn_raw": (idle["rss"] - raw["rss"]) / n,
        "anon_bytes_per_conn": (idle["rss_anon"] - warm["rss_anon"]) / n,
        "kernel_slab_per_conn": (kernel1["slab"] - kernel0["slab"]) / n,
        "kernel_sunreclaim_per_conn": (kernel1["sunreclaim"] - kernel0["sunreclaim"]) / n,
        "kernel_tcp_mem_per_conn": (kernel1["tcp_mem"] - kernel0["tcp_mem"]) / n,
    }


def run(
    servers: list[str], connections: int, deflate: bool, log: Any = print, user_ids: str = "int"
) -> dict[str, Any]:
    """run measures every usable server in turn; unusable ones are listed with the reason.

    user_ids: the form of lowmemws's user ids (int, str, long-str: see servers/common.py)."""

    def measure_one(name: str) -> dict[str, Any]:
        log(f"  {name}: measuring {connections:,} idle connections (deflate offered: {deflate})")
        if name == "lowmemws" and user_ids != "int":
            extra = ("--user-ids", user_ids)
            return measure(name, connections, deflate, log, extra=extra, label=f"{user_ids} ids")
        return measure(name, connections, deflate, log)

    rows, skipped = report.each_server(servers, measure_one, log)
    return {"connections": connections, "deflate": deflate, "rows": rows, "skipped": skipped}


def mib(n: float) -> str:
    return f"{n / 1048576:.1f}"


def render(result: dict[str, Any]) -> str:
    """render formats one run as a Markdown table, a row per server."""
    base = next((r for r in result["rows"] if r["server"] == "lowmemws"), None)
    rows = []
    for r in result["rows"]:
        ratio = (
            f"{r['bytes_per_conn'] / base['bytes_per_conn']:.0f}x"
            if base and base["bytes_per_conn"] > 0
            else "-"
        )
        rows.append(
            [
                f"{r['server']} {r['version']}",
                f"{r['connections']:,}",
                f"{r['bytes_per_conn']:,.0f}",
                ratio,
                f"{r['bytes_per_conn_raw']:,.0f}",
                f"{r['anon_bytes_per_conn']:,.0f}",
                f"{mib(r['rss_raw'])} / {mib(r['rss_warm'])} / {mib(r['rss_idle'])} / "
                f"{mib(r['rss_after'])}",
                f"{r['kernel_slab_per_conn']:,.0f}",
                f"{r['deflate_negotiated']:,}",
                f"{r['pinged']['answered']:,}/{r['pinged']['asked']:,}",
            ]
        )
    headers = [
        "server",
        "conns",
        "bytes/conn",
        "vs lowmemws",
        "bytes/conn (raw base)",
        "RssAnon/conn",
        "RSS MiB raw / warm / idle / after",
        "kernel slab/conn (both ends)",
        "deflate",
        "pings answered",
    ]
    return report.table(headers, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = report.parser(__doc__)
    p.add_argument("--connections", type=int, default=19_000)
    report.add_servers(p)
    p.add_argument("--deflate", action="store_true", help="clients offer permessage-deflate")
    p.add_argument(
        "--user-ids",
        choices=("int", "str", "long-str", "uuid"),
        default="int",
        help="lowmemws user ids: int, a short str (kept in the tag), a long str (hashed)",
    )
    return report.main(p, argv, run_args, render)


def run_args(a: argparse.Namespace) -> dict[str, Any]:
    """run_args runs with the figures given on the command line."""
    if a.connections > 19_000:
        sys.exit("at most 19,000 connections: one server process has 20,000 file descriptors")
    return run(a.servers.split(","), a.connections, a.deflate, user_ids=a.user_ids)


if __name__ == "__main__":
    main()
