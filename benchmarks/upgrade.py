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
        [--user-ids int|str|long-str]
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
    rounds: int,
    log: Any = print,
    *,
    extra: tuple[str, ...] = (),
    label: str = "",
    python: str | None = None,
) -> dict[str, Any]:
    """measure runs the upgrade-cost experiment on one server (see the module docstring).

    ``extra`` is passed to the server script (a variant, such as auth_io.py's async
    on_connect: ``("--hook", "async")``); ``label`` names the variant in the log and the row;
    ``python`` runs the server with another interpreter (another build of the library).
    """
    per_upgrade, opened_total, open_seconds = [], 0, []
    main_thread, other_threads = [], []
    with Server(name, extra=extra, python=python) as srv:
        for i in range(rounds):
            with LoadClients(srv.host, srv.port, connections) as lc:
                time.sleep(1.0)  # the client processes start; the server is idle again
                procstats.wait_idle(srv.pid)
                before = procstats.cpu_ticks(srv.pid)
                threads_before = procstats.thread_cpu_ticks(srv.pid)
                opened = lc.open()
                used = procstats.cpu_ticks(srv.pid) - before
                threads_after = procstats.thread_cpu_ticks(srv.pid)
                lc.close()
            n = max(1, opened["opened"])
            per_upgrade.append(procstats.ticks_to_us(used) / n)
            main = threads_after.get(srv.pid, 0) - threads_before.get(srv.pid, 0)
            main_thread.append(procstats.ticks_to_us(main) / n)
            other_threads.append(procstats.ticks_to_us(used - main) / n)
            opened_total += opened["opened"]
            open_seconds.append(opened["seconds"])
            log(
                f"  {label or name}: round {i + 1}: {opened['opened']:,} upgrades, "
                f"{per_upgrade[-1]:.1f} us CPU each"
            )
            time.sleep(1.0)
    s = report.spread(per_upgrade)
    return {
        "server": name,
        "version": version(name),
        "variant": label,
        "server_args": list(extra),
        "connections": connections,
        "upgrades": opened_total,
        "us_per_upgrade": s,
        # The server's main thread (lowmemws: the loop) and every other thread (hook
        # threads, an asyncio thread); a thread that ended during a round counts as other.
        "us_per_upgrade_main_thread": report.spread(main_thread),
        "us_per_upgrade_other_threads": report.spread(other_threads),
        "upgrades_per_s_per_core": 1e6 / s["median"] if s["median"] else None,
        "open_seconds": report.spread(open_seconds),
    }


def run(
    servers: list[str], connections: int, rounds: int, log: Any = print, user_ids: str = "int"
) -> dict[str, Any]:
    """run measures every usable server in turn (user_ids: lowmemws's form of user id)."""

    def measure_one(name: str) -> dict[str, Any]:
        if name == "lowmemws" and user_ids != "int":
            extra = ("--user-ids", user_ids)
            return measure(name, connections, rounds, log, extra=extra, label=f"{user_ids} ids")
        return measure(name, connections, rounds, log)

    rows, skipped = report.each_server(servers, measure_one, log)
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
                report.median_range(s, ".1f"),
                f"{r['upgrades_per_s_per_core']:,.0f}",
                f"{r['open_seconds']['median']:.1f}",
            ]
        )
    headers = ["server", "upgrades", "CPU us/upgrade (min-max)", "upgrades/s/core", "wall s/round"]
    return report.table(headers, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = report.parser(__doc__)
    p.add_argument("--connections", type=int, default=19_000)
    p.add_argument("--rounds", type=int, default=3)
    report.add_servers(p)
    p.add_argument(
        "--user-ids",
        choices=("int", "str", "long-str", "uuid"),
        default="int",
        help="lowmemws user ids: int, a short str (kept in the tag), a long str (hashed)",
    )
    return report.main(p, argv, run_args, render)


def run_args(a: argparse.Namespace) -> dict[str, Any]:
    """run_args runs with the figures given on the command line."""
    return run(a.servers.split(","), min(a.connections, 19_000), a.rounds, user_ids=a.user_ids)


if __name__ == "__main__":
    main()
