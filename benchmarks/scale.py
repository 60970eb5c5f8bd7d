"""scale: how many idle connections lowmemws holds on this machine, and what each one costs.

lowmemws runs with P SO_REUSEPORT worker processes (``Gateway(processes=P)``, via
``servers/lowmemws_server.py --processes P``), since one process may hold at most 20,000 file
descriptors. Load-client processes (at most 18,000 connections each, each on its own source
address 127.0.0.2, 127.0.0.3, ...) open N connections and leave them idle for a while; then
every connection is pinged and must answer. Reported: connections held, time to open them,
server CPU while opening, user-space bytes per connection over the whole server process tree
(RSS sum and PSS sum, idle minus before), kernel memory (Slab, SUnreclaim, TCP pages; both
ends of each loopback connection), pongs received after the idle period, and the tree's RSS
after everything closed.

The heartbeat: lowmemws pings a connection idle for ``ping_interval`` (30 s by default,
jittered) and drops it if no pong arrives within 10 s. The run uses the default heartbeat
(``--ping-interval`` overrides it) and also checks liveness with its own ping after the idle
period. The server side reports, from its /metrics, the longest loop lag any worker saw, the
heads answered 408 and the connections dropped for a missed pong: with the server's own lag
discounted from its deadlines (issue 17), both should stay 0 while the clients are healthy.

The load clients are the C worker (``loadclient.c``, ``--engine c``, the default): Python
workers holding 18,000 connections each cannot answer the heartbeat's pings in time while the
others open theirs on the same cores, so the server drops them and the run measures the
clients. ``--engine python`` runs the Python workers (for comparison).

    python benchmarks/scale.py --connections 1000000 --processes 56   # the headline run
    python benchmarks/scale.py --connections 50000 --processes 4      # a quick run
    python benchmarks/scale.py --connections 50000 --processes 4 --engine python
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import procstats
import report
from loadclients import LoadClients
from serverctl import Server, scrape_metrics, version

PER_CLIENT_PROCESS = 18_000


def run(
    connections: int,
    processes: int,
    idle: float,
    window: int,
    log: Any = print,
    ping_interval: float | None = None,
    engine: str = "c",
) -> dict[str, Any]:
    """run holds ``connections`` idle connections on lowmemws (see the module docstring)."""
    if connections > processes * 19_000:
        raise SystemExit(f"{connections:,} connections need more than {processes} processes")
    extra: tuple[str, ...] = ("--processes", str(processes))
    if ping_interval is not None:
        extra += ("--ping-interval", str(ping_interval))
    with Server("lowmemws", extra=extra, timeout=120) as srv:
        time.sleep(1.0)
        before = procstats.settled_tree_memory(srv.pid, timeout=20)
        kernel0 = procstats.kernel_memory()
        log(
            f"  lowmemws: {before['processes']} processes, "
            f"{before['rss'] / 1048576:.0f} MiB RSS in all; opening {connections:,}"
        )
        with LoadClients(
            srv.host, srv.port, connections, per_worker=PER_CLIENT_PROCESS, engine=engine
        ) as lc:

            def client_cpu() -> int:
                return sum(procstats.cpu_ticks(p.pid) for p in lc.procs)

            client0 = client_cpu()
            cpu0, t0 = procstats.tree_cpu_ticks(srv.pid), time.monotonic()
            opened = lc.open(window=window, timeout=1800)
            open_wall = time.monotonic() - t0
            open_cpu = procstats.tree_cpu_ticks(srv.pid) - cpu0
            client1 = client_cpu()
            log(f"  lowmemws: {opened['opened']:,} open in {open_wall:.0f} s; idle {idle:.0f} s")
            time.sleep(idle)
            held = procstats.settled_tree_memory(srv.pid, timeout=60)
            kernel1 = procstats.kernel_memory()
            ping = lc.ping(timeout=600)
            log(f"  lowmemws: {ping['answered']:,}/{ping['asked']:,} answered a ping")
            client2 = client_cpu()
            server_side = scrape_metrics(srv.host, srv.port)
            log(
                f"  lowmemws: loop lag max {server_side['lowmemws_loop_lag_max_seconds']:.2f} s, "
                f"{server_side['lowmemws_handshake_timeouts_total']:.0f} x 408, "
                f"{server_side['lowmemws_ping_timeouts_total']:.0f} pong timeouts"
            )
            lc.close(timeout=600)
        after = procstats.settled_tree_memory(srv.pid, timeout=60)
    n = max(1, opened["opened"])
    return {
        "server": "lowmemws",
        "version": version("lowmemws"),
        "processes": processes,
        "client_processes": len(lc.counts),
        "client_engine": engine,
        "client_cpu_open_seconds": procstats.ticks_to_us(client1 - client0) / 1e6,
        "client_cpu_idle_seconds": procstats.ticks_to_us(client2 - client1) / 1e6,
        "wanted": connections,
        "connections": opened["opened"],
        "open_seconds": open_wall,
        "open_cpu_us_per_conn": procstats.ticks_to_us(open_cpu) / n,
        "idle_seconds": idle,
        "ping_interval": ping_interval if ping_interval is not None else 30.0,
        "loop_lag_max_seconds": server_side["lowmemws_loop_lag_max_seconds"],
        "handshake_timeouts": int(server_side["lowmemws_handshake_timeouts_total"]),
        "ping_timeouts": int(server_side["lowmemws_ping_timeouts_total"]),
        "open_failed": opened["failed"],
        "ping": ping,
        "tree_before": before,
        "tree_idle": held,
        "tree_after": after,
        "rss_bytes_per_conn": (held["rss"] - before["rss"]) / n,
        "pss_bytes_per_conn": (held["pss"] - before["pss"]) / n,
        "kernel_before": kernel0,
        "kernel_idle": kernel1,
        "kernel_slab_per_conn": (kernel1["slab"] - kernel0["slab"]) / n,
        "kernel_sunreclaim_per_conn": (kernel1["sunreclaim"] - kernel0["sunreclaim"]) / n,
        "kernel_total_bytes": (kernel1["slab"] - kernel0["slab"])
        + (kernel1["tcp_mem"] - kernel0["tcp_mem"]),
    }


def render(r: dict[str, Any]) -> str:
    """render formats one scale run as a two-column Markdown table."""
    mib = 1048576
    rows = [
        ["connections held", f"{r['connections']:,} of {r['wanted']:,}"],
        [
            "server worker processes / load-client processes",
            f"{r['processes']} / {r['client_processes']} ({r.get('client_engine', 'python')})",
        ],
        ["time to open", f"{r['open_seconds']:.0f} s"],
        ["connections dropped after opening", f"{r['ping']['lost']:,}"],
        [
            "heads answered 408 / dropped for a missed pong (server)",
            f"{r.get('handshake_timeouts', 0):,} / {r.get('ping_timeouts', 0):,}",
        ],
        ["longest loop lag (any worker)", f"{r.get('loop_lag_max_seconds', 0):.2f} s"],
        ["server heartbeat (Config.ping_interval)", f"{r.get('ping_interval', 30):.0f} s"],
        ["server CPU per connection opened", f"{r['open_cpu_us_per_conn']:.1f} us"],
        [
            "load-client CPU while opening / idle and ping (all clients)",
            f"{r.get('client_cpu_open_seconds', 0):.1f} / "
            f"{r.get('client_cpu_idle_seconds', 0):.1f} s",
        ],
        [
            "user-space bytes/conn (RSS sum, PSS sum)",
            f"{r['rss_bytes_per_conn']:,.0f}, {r['pss_bytes_per_conn']:,.0f}",
        ],
        [
            "tree RSS before / idle / after",
            f"{r['tree_before']['rss'] / mib:,.0f} / {r['tree_idle']['rss'] / mib:,.0f} / "
            f"{r['tree_after']['rss'] / mib:,.0f} MiB",
        ],
        [
            "tree PSS before / idle / after",
            f"{r['tree_before']['pss'] / mib:,.0f} / {r['tree_idle']['pss'] / mib:,.0f} / "
            f"{r['tree_after']['pss'] / mib:,.0f} MiB",
        ],
        ["kernel slab per connection (both ends)", f"{r['kernel_slab_per_conn']:,.0f} B"],
        ["kernel memory added in all", f"{r['kernel_total_bytes'] / mib:,.0f} MiB"],
        [
            f"answered a ping after {r['idle_seconds']:.0f} s idle",
            f"{r['ping']['answered']:,} of {r['ping']['asked']:,}",
        ],
    ]
    return report.table(["figure", f"lowmemws {r['version']}"], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = report.parser(__doc__)
    p.add_argument("--connections", type=int, default=50_000)
    p.add_argument("--processes", type=int, default=0, help="default: 1 per 18,000 connections")
    p.add_argument("--idle", type=float, default=30.0, help="seconds idle before the ping")
    p.add_argument("--window", type=int, default=512, help="handshakes in flight in all")
    p.add_argument(
        "--ping-interval", type=float, default=None, help="lowmemws heartbeat (s); default 30"
    )
    p.add_argument(
        "--engine",
        choices=("c", "python"),
        default="c",
        help="load-client workers: c (loadclient.c, default) or python (loadclients.Worker)",
    )
    return report.main(p, argv, run_args, render)


def run_args(a: argparse.Namespace) -> dict[str, Any]:
    """run_args runs with the figures given on the command line."""
    processes = a.processes or max(1, -(-a.connections // 18_000))
    return run(
        a.connections,
        processes,
        a.idle,
        a.window,
        ping_interval=a.ping_interval,
        engine=a.engine,
    )


if __name__ == "__main__":
    main()
