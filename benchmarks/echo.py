"""echo: request/response echo over 100 connections at 256 B and 8 KiB, per server, in one run.

For each server: one fresh process and the same client, one load-client process holding 100
connections (so the server has one of the 2 cores and the client the other). Each connection
sends a binary message, waits for its echo, and sends the next (one message in flight per
connection) for D seconds. Server CPU (utime + stime, /proc/PID/stat) is read before and after
each round. Figures per message size: messages per second (wall clock, since the client keeps
every connection busy) and server CPU microseconds per message (request + echo); median and
spread over R rounds.

    python benchmarks/echo.py [--connections 100] [--sizes 256,8192] [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import procstats
from loadclients import LoadClients
from serverctl import ALL_SERVERS, Server, usable, version


def measure(
    name: str,
    connections: int,
    sizes: list[int],
    seconds: float,
    rounds: int,
    log: Any = print,
) -> dict[str, Any]:
    """measure runs the echo experiment on one server (see the module docstring)."""
    figures: dict[str, Any] = {}
    with Server(name) as srv, LoadClients(srv.host, srv.port, connections, min_workers=1) as lc:
        lc.open()
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
                "messages_per_s": procstats.spread(rates),
                "us_per_message": procstats.spread(per_msg),
            }
            log(
                f"  {name}: {size} B: {figures[str(size)]['messages_per_s']['median']:,.0f} "
                f"msg/s, {figures[str(size)]['us_per_message']['median']:.1f} us CPU each"
            )
        lc.close()
    return {"server": name, "version": version(name), "connections": connections, "sizes": figures}


def run(
    servers: list[str],
    connections: int,
    sizes: list[int],
    seconds: float,
    rounds: int,
    log: Any = print,
) -> dict[str, Any]:
    """run measures every usable server in turn."""
    rows, skipped = [], {}
    for name in servers:
        ok, why = usable(name)
        if not ok:
            log(f"  {name}: skipped ({why})")
            skipped[name] = why
            continue
        try:
            rows.append(measure(name, connections, sizes, seconds, rounds, log))
        except Exception as exc:  # a broken server must not hide the others' figures
            log(f"  {name}: failed ({exc})")
            skipped[name] = f"failed: {exc}"
    return {
        "connections": connections,
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
                    f"{r['server']} {r['version']}",
                    f"{int(size):,} B",
                    f"{m['median']:,.0f} ({m['min']:,.0f}-{m['max']:,.0f})",
                    f"{u['median']:.1f} ({u['min']:.1f}-{u['max']:.1f})",
                ]
            )
    headers = ["server", "message", "messages/s (min-max)", "server CPU us/message (min-max)"]
    return procstats.table(headers, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--sizes", default="256,8192")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--servers", default=",".join(ALL_SERVERS))
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    result = run(a.servers.split(","), a.connections, sizes, a.seconds, a.rounds)
    print(render(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
