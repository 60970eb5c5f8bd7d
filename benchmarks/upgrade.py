"""upgrade: server CPU time per completed WebSocket upgrade, per server, in one run.

For each server: one fresh process, then R rounds. In a round the load clients open N
connections (a bounded number of handshakes in flight); server CPU (utime + stime from
/proc/PID/stat) is read before the first connect and after the last 101 arrived. The clients
KEEP their connections during the measured window, so the figure is accept + request parse +
101 response + per-connection set-up (user id, topic subscription), and excludes the close;
the connections are closed after the window and the server left to settle before the next
round. Figures: median and spread over the rounds of CPU microseconds per upgrade, and the
implied upgrades per second per core (1e6 / that).

    python benchmarks/upgrade.py [--connections 19000] [--rounds 3] [--servers a,b]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import procstats
from loadclients import LoadClients
from serverctl import ALL_SERVERS, Server, usable, version


def measure(name: str, connections: int, rounds: int, log: Any = print) -> dict[str, Any]:
    """measure runs the upgrade-cost experiment on one server (see the module docstring)."""
    per_upgrade, opened_total, open_seconds = [], 0, []
    with Server(name) as srv:
        for i in range(rounds):
            with LoadClients(srv.host, srv.port, connections) as lc:
                time.sleep(1.0)  # the client processes start; the server is idle again
                procstats.wait_idle(srv.pid)
                before = procstats.cpu_ticks(srv.pid)
                opened = lc.open()
                used = procstats.cpu_ticks(srv.pid) - before
                lc.close()
            n = max(1, opened["opened"])
            per_upgrade.append(procstats.ticks_to_us(used) / n)
            opened_total += opened["opened"]
            open_seconds.append(opened["seconds"])
            log(
                f"  {name}: round {i + 1}: {opened['opened']:,} upgrades, "
                f"{per_upgrade[-1]:.1f} us CPU each"
            )
            time.sleep(1.0)
    s = procstats.spread(per_upgrade)
    return {
        "server": name,
        "version": version(name),
        "connections": connections,
        "upgrades": opened_total,
        "us_per_upgrade": s,
        "upgrades_per_s_per_core": 1e6 / s["median"] if s["median"] else None,
        "open_seconds": procstats.spread(open_seconds),
    }


def run(servers: list[str], connections: int, rounds: int, log: Any = print) -> dict[str, Any]:
    """run measures every usable server in turn."""
    rows, skipped = [], {}
    for name in servers:
        ok, why = usable(name)
        if not ok:
            log(f"  {name}: skipped ({why})")
            skipped[name] = why
            continue
        try:
            rows.append(measure(name, connections, rounds, log))
        except Exception as exc:  # a broken server must not hide the others' figures
            log(f"  {name}: failed ({exc})")
            skipped[name] = f"failed: {exc}"
    return {"connections": connections, "rounds": rounds, "rows": rows, "skipped": skipped}


def render(result: dict[str, Any]) -> str:
    """render formats one run as a Markdown table, a row per server."""
    rows = []
    for r in result["rows"]:
        s = r["us_per_upgrade"]
        rows.append(
            [
                f"{r['server']} {r['version']}",
                f"{r['upgrades']:,}",
                f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})",
                f"{r['upgrades_per_s_per_core']:,.0f}",
                f"{r['open_seconds']['median']:.1f}",
            ]
        )
    headers = ["server", "upgrades", "CPU us/upgrade (min-max)", "upgrades/s/core", "wall s/round"]
    return procstats.table(headers, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--connections", type=int, default=19_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--servers", default=",".join(ALL_SERVERS))
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args(argv)
    result = run(a.servers.split(","), min(a.connections, 19_000), a.rounds)
    print(render(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
