"""echo: request/response echo over 100 connections at 256 B and 8 KiB, per server, in one run.

For each server: one fresh process and the same client, one load-client process holding 100
connections (so the server has one of the 2 cores and the client the other). Each connection
sends a binary message, waits for its echo, and sends the next (one message in flight per
connection) for D seconds. Server CPU (utime + stime, /proc/PID/stat) is read before and after
each round. Figures per message size: messages per second (wall clock, since the client keeps
every connection busy) and server CPU microseconds per message (request + echo); median and
spread over R rounds.

    python benchmarks/echo.py [--connections 100] [--sizes 256,8192] [--seconds 2] [--rounds 3]

With ``--deflate`` the clients offer permessage-deflate (as browsers do) and send a JSON
document of each size; where the server negotiated it, each message goes compressed (made
once by the client, RSV1 set), so the server's CPU per message includes decompressing it
and compressing its echo with its library's default settings.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import procstats
import report
from loadclients import LoadClients
from serverctl import Server, version


def measure(
    name: str,
    connections: int,
    sizes: list[int],
    seconds: float,
    rounds: int,
    log: Any = print,
    deflate: bool = False,
) -> dict[str, Any]:
    """measure runs the echo experiment on one server (see the module docstring)."""
    figures: dict[str, Any] = {}
    with (
        Server(name) as srv,
        LoadClients(srv.host, srv.port, connections, min_workers=1, deflate=deflate) as lc,
    ):
        opened = lc.open()
        for size in sizes:
            lc.echo(size, 0.3, connections)  # warm-up, not measured
            rates, per_msg = [], []
            for _ in range(rounds):
                time.sleep(0.2)
                procstats.wait_idle(srv.pid)
                before = procstats.cpu_ticks(srv.pid)
                got = lc.echo(size, seconds, connections)
                used = procstats.cpu_ticks(srv.pid) - before
                rates.append(got["messages"] / got["seconds"])
                per_msg.append(procstats.ticks_to_us(used) / max(1, got["messages"]))
            figures[str(size)] = {
                "messages_per_s": report.spread(rates),
                "us_per_message": report.spread(per_msg),
            }
            log(
                f"  {name}: {size} B: {figures[str(size)]['messages_per_s']['median']:,.0f} "
                f"msg/s, {figures[str(size)]['us_per_message']['median']:.1f} us CPU each"
            )
        lc.close()
    return {
        "server": name,
        "version": version(name),
        "connections": connections,
        "deflate_negotiated": opened.get("deflated", 0),
        "sizes": figures,
    }


def run(
    servers: list[str],
    connections: int,
    sizes: list[int],
    seconds: float,
    rounds: int,
    log: Any = print,
    deflate: bool = False,
) -> dict[str, Any]:
    """run measures every usable server in turn."""
    rows, skipped = report.each_server(
        servers,
        lambda name: measure(name, connections, sizes, seconds, rounds, log, deflate),
        log,
    )
    return {
        "connections": connections,
        "deflate": deflate,
        "sizes": sizes,
        "seconds": seconds,
        "rounds": rounds,
        "rows": rows,
        "skipped": skipped,
    }


def render(result: dict[str, Any]) -> str:
    """render formats one run as a Markdown table, a row per server and message size."""
    rows = []
    for r in result["rows"]:
        for size, f in r["sizes"].items():
            m, u = f["messages_per_s"], f["us_per_message"]
            rows.append(
                [
                    f"{r['server']} {r['version']}"
                    + (" (deflate)" if r.get("deflate_negotiated") else ""),
                    f"{int(size):,} B",
                    report.median_range(m, ",.0f"),
                    report.median_range(u, ".1f"),
                ]
            )
    headers = ["server", "message", "messages/s (min-max)", "server CPU us/message (min-max)"]
    return report.table(headers, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = report.parser(__doc__)
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--sizes", default="256,8192")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--deflate", action="store_true", help="clients offer permessage-deflate")
    report.add_servers(p)
    return report.main(p, argv, run_args, render)


def run_args(a: argparse.Namespace) -> dict[str, Any]:
    """run_args runs with the figures given on the command line."""
    sizes = [int(s) for s in a.sizes.split(",")]
    return run(a.servers.split(","), a.connections, sizes, a.seconds, a.rounds, deflate=a.deflate)


if __name__ == "__main__":
    main()
