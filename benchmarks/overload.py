"""overload: how many healthy idle connections survive an overloaded gateway (issue 17).

Runs the two overloads of tests/test_overload.py (cases 1 and 2), ``--runs`` times each (3 by
default: on an unfixed gateway the outcome depends on where the overload finds its loop),
each on a fresh gateway (tests/adversarial/gateway_server.py, ``Config(ping_interval=2,
ping_timeout=3)`` by default) with a fresh crowd of N idle clients in a child process
(tests/support/ping_crowd.py) that answer every ping 50 ms after it arrived:

- busy loop: right after a ping round reached (nearly) all clients, a slow synchronous hook
  keeps the loop busy for 6 s (``POST /stall``);
- SIGSTOP: right after a ping round, the gateway process is stopped for 6 s, then continued.

ping_interval + ping_timeout + 2 s after each overload it counts the connections still open
(as the clients see them and as the server's ``lowmemws_connections`` gauge says) and reads
the loop lag the server reports (``lowmemws_loop_lag_seconds`` and
``lowmemws_loop_lag_max_seconds``; "missing" when /metrics has none), then prints a table.
``--json PATH`` writes the figures. Everything runs on 127.0.0.1 and its aliases; every
child process is ended by PID.

    python benchmarks/overload.py [--clients 2000] [--stall 6] [--runs 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import textwrap
import time
from importlib import metadata
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.adversarial.adversary import start_gateway  # noqa: E402
from tests.support.overload import (  # noqa: E402
    CrowdProcess,
    gauge,
    lag_figures,
    stop_server,
    through_ping_round,
)

CASES = (("busy loop", "stall"), ("SIGSTOP", "sigstop"))


def run_case(args: argparse.Namespace, action: str) -> dict[str, Any]:
    """run_case runs one overload on a fresh gateway and crowd and returns its figures."""
    config = {"ping_interval": args.ping_interval, "ping_timeout": args.ping_timeout}
    server = start_gateway(dict(config))
    try:
        with CrowdProcess(
            server, args.clients, pong_delay=args.pong_delay, lifetime=args.stall + 120
        ) as crowd:
            upgraded = crowd.upgraded()
            before = gauge(server, "connections")
            started = time.monotonic()
            report = through_ping_round(
                crowd,
                server,
                action,
                ping_interval=args.ping_interval,
                ping_timeout=args.ping_timeout,
                seconds=args.stall,
            )
            after = gauge(server, "connections")
            lag, lag_max = lag_figures(server)
        return {
            "action": action,
            "clients": args.clients,
            "open_before": upgraded["open"],
            "server_count_before": int(before),
            "open_after": report["open"],
            "server_count_after": int(after),
            "eof_after": report["eof"],
            "eof_without_close_frame": report["eof_without_close"],
            "close_frames": report["close_frames"],
            "fired_by": report["fired"]["rule"],
            "pongs_before_overload": report["pongs_before_overload"],
            "began_ms_after_first_ping": round(report["began_after_first_ping"] * 1000, 1),
            "loop_lag_seconds": lag,
            "loop_lag_max_seconds": lag_max,
            "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        stop_server(server)


def figure(value: float | None) -> str:
    return "missing" if value is None else f"{value:.2f} s"


def table(args: argparse.Namespace, rows: list[tuple[str, int, dict[str, Any]]]) -> str:
    """table renders the figures as a small fixed-width table with a heading."""
    lines = [
        f"lowmemws {metadata.version('lowmemws')} overload (issue 17): {args.clients} idle"
        f" clients, ping_interval={args.ping_interval:g} s, ping_timeout={args.ping_timeout:g} s,"
        f" pong after {args.pong_delay * 1000:.0f} ms, overload {args.stall:g} s right after a"
        " ping round",
        f"python {platform.python_version()}, {platform.system()} {platform.release()},"
        f" {os.cpu_count()} CPUs",
        "",
        f"{'overload':<11} {'run':>3} {'open before':>11} {'open after':>10} {'server count':>12}"
        f" {'EOF':>5} {'close frames':>12} {'began':>7} {'pongs before':>12} {'loop lag':>9}"
        f" {'lag max':>9}",
    ]
    for name, run, r in rows:
        frames = sum(r["close_frames"].values())
        lines.append(
            f"{name:<11} {run:>3} {r['open_before']:>11} {r['open_after']:>10}"
            f" {r['server_count_after']:>12} {r['eof_after']:>5} {frames:>12}"
            f" {r['began_ms_after_first_ping']:>4.0f} ms {r['pongs_before_overload']:>12}"
            f" {figure(r['loop_lag_seconds']):>9} {figure(r['loop_lag_max_seconds']):>9}"
        )
    lines.append("")
    lines += textwrap.wrap(
        "open before/after: connections the clients see open (no close frame, no EOF) before"
        " the overload and ping_interval + ping_timeout + 2 s after it; server count: the"
        " lowmemws_connections gauge then; EOF: connections the server ended (close frames:"
        " those it closed with a close frame); began: when the overload began after the ping"
        " round's first ping arrived; pongs before: pongs of that round the clients sent before"
        " it began (the server may have read those in time); loop lag, lag max:"
        " lowmemws_loop_lag_seconds and lowmemws_loop_lag_max_seconds then.",
        width=96,
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--stall", type=float, default=6.0, help="overload length, seconds")
    parser.add_argument("--ping-interval", type=float, default=2.0)
    parser.add_argument("--ping-timeout", type=float, default=3.0)
    parser.add_argument("--pong-delay", type=float, default=0.05)
    parser.add_argument("--runs", type=int, default=3, help="runs of each overload")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    args = parser.parse_args()
    if not 1 <= args.clients <= 8000:
        parser.error("--clients must be 1 .. 8000")
    if not 1 <= args.runs <= 10:
        parser.error("--runs must be 1 .. 10")
    rows = []
    for name, action in CASES:
        for run in range(1, args.runs + 1):
            rows.append((name, run, run_case(args, action)))
    print(table(args, rows))
    if args.json:
        document = {
            "lowmemws": metadata.version("lowmemws"),
            "config": {"ping_interval": args.ping_interval, "ping_timeout": args.ping_timeout},
            "pong_delay": args.pong_delay,
            "stall": args.stall,
            "runs": args.runs,
            "cases": {
                action: [r for _, _, r in rows if r["action"] == action] for _, action in CASES
            },
        }
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2)
            out.write("\n")


if __name__ == "__main__":
    main()
