"""fanout: one 256-byte message to N subscribers, per server, against the raw floor, in one run.

For each server (and the floor): one fresh process, N subscriber connections from load-client
processes (which read and count every frame), and a control connection. A round asks the server
to publish K messages of SIZE bytes to topic "all" with its library's natural fan-out
(lowmemws ``gw.publish``, websockets ``broadcast()``, a loop over aiohttp / picows
connections); server CPU (utime + stime, /proc/PID/stat) is read before the request and after
every client has received all K * N frames. Figures per round: frames per CPU-second (= per
core) and CPU microseconds per frame; median and spread over R rounds; wall-clock frames/s is
shown for reference only (the clients share the 2 cores).

The floor is ``servers/floor_server.py``: a plain Python loop of non-blocking ``socket.send()``
of the same pre-built frame over the same number of loopback sockets, measured the same way,
with lowmemws's ratio to it.

    python benchmarks/fanout.py [--connections 19000] [--messages 20] [--rounds 5] [--size 256]

With ``--deflate`` the clients offer permessage-deflate (as browsers do) and the message is a
JSON document of SIZE bytes (``--size 4096``: a 4 KiB notification); a server that negotiates
compression sends it compressed, and the floor sends the same compressed bytes (compressed
once, outside the loop), so the ratio compares fan-out of the bytes on the wire.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import procstats
import report
from loadclients import ControlClient, LoadClients
from serverctl import Server, version

sys.path.insert(0, str(Path(__file__).resolve().parent / "servers"))
from common import json_payload  # noqa: E402


def measure(
    name: str,
    connections: int,
    messages: int,
    rounds: int,
    size: int,
    log: Any = print,
    deflate: bool = False,
) -> dict[str, Any]:
    """measure runs the fan-out experiment on one server (see the module docstring)."""
    per_frame, wall_rate, written = [], [], 0
    kind = "json z" if deflate else ""
    with Server(name) as srv, LoadClients(srv.host, srv.port, connections, deflate=deflate) as lc:
        opened = lc.open()
        control = ControlClient(srv.host, srv.port)
        control.publish(1, size, kind)  # warm-up round, not measured
        lc.wait_frames(1)
        for i in range(rounds):
            lc.reset()
            time.sleep(0.3)
            procstats.wait_idle(srv.pid)
            before, t0 = procstats.cpu_ticks(srv.pid), time.monotonic()
            written = control.publish(messages, size, kind)
            got = lc.wait_frames(messages)
            used = procstats.cpu_ticks(srv.pid) - before
            wall = time.monotonic() - t0
            frames = got["frames"]
            per_frame.append(procstats.ticks_to_us(used) / max(1, frames))
            wall_rate.append(frames / wall)
            log(
                f"  {name}: round {i + 1}: {frames:,}/{got['target']:,} frames, "
                f"{per_frame[-1]:.2f} us CPU each"
            )
        control.close()
        lc.close()
    s = report.spread(per_frame)
    return {
        "server": name,
        "version": version(name),
        "connections": opened["opened"],
        "deflate_negotiated": opened.get("deflated", 0),
        "messages": messages,
        "size": size,
        "written_last_round": written,
        "us_per_frame": s,
        "frames_per_cpu_s": 1e6 / s["median"] if s["median"] else None,
        "wall_frames_per_s": report.spread(wall_rate),
    }


def run(
    servers: list[str],
    connections: int,
    messages: int,
    rounds: int,
    size: int,
    log: Any = print,
    deflate: bool = False,
) -> dict[str, Any]:
    """run measures the floor and every usable server in turn."""
    rows, skipped = report.each_server(
        ["floor", *servers],
        lambda name: measure(name, connections, messages, rounds, size, log, deflate),
        log,
    )
    floor = next((r for r in rows if r["server"] == "floor"), None)
    for r in rows:
        if floor and r["frames_per_cpu_s"] and floor["frames_per_cpu_s"]:
            r["ratio_to_floor"] = r["frames_per_cpu_s"] / floor["frames_per_cpu_s"]
    return {
        "connections": connections,
        "messages": messages,
        "rounds": rounds,
        "size": size,
        "deflate": deflate,
        "wire_payload_bytes": wire_bytes(size, deflate),
        "floor": "plain Python loop of non-blocking socket.send() (servers/floor_server.py)",
        "rows": rows,
        "skipped": skipped,
    }


def wire_bytes(size: int, deflate: bool) -> dict[str, int]:
    """wire_bytes: the payload of one frame, plain and as lowmemws compresses it (level 1)."""
    if not deflate:
        return {"plain": size}
    z = zlib.compressobj(1, zlib.DEFLATED, -15)
    payload = json_payload(size)
    return {"plain": size, "compressed": len(z.compress(payload) + z.flush(zlib.Z_SYNC_FLUSH)) - 4}


def render(result: dict[str, Any]) -> str:
    """render formats one run as a Markdown table, a row per server (the floor first)."""
    rows = []
    for r in result["rows"]:
        s = r["us_per_frame"]
        label = "floor: Python send() loop" if r["server"] == "floor" else r["server"]
        rows.append(
            [
                f"{label} {r['version']}".replace(" -", ""),
                f"{r['connections']:,}",
                f"{r['frames_per_cpu_s']:,.0f}",
                report.median_range(s, ".2f"),
                f"{r.get('ratio_to_floor', 0):.2f}",
                f"{r['wall_frames_per_s']['median']:,.0f}",
            ]
        )
    headers = [
        "server",
        "subscribers",
        "frames per CPU-s",
        "CPU us/frame (min-max)",
        "x floor",
        "wall frames/s",
    ]
    table = report.table(headers, rows)
    if result.get("deflate"):
        wire = result["wire_payload_bytes"]
        table += (
            f"\npermessage-deflate offered; payload per frame: {wire['plain']:,} B JSON plain, "
            f"{wire['compressed']:,} B compressed (negotiated by: "
            + ", ".join(f"{r['server']} {r['deflate_negotiated']:,}" for r in result["rows"])
            + ")\n"
        )
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = report.parser(__doc__)
    p.add_argument("--connections", type=int, default=19_000)
    p.add_argument("--messages", type=int, default=20, help="messages per round (K)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--deflate", action="store_true", help="clients offer permessage-deflate")
    report.add_servers(p)
    return report.main(p, argv, run_args, render)


def run_args(a: argparse.Namespace) -> dict[str, Any]:
    """run_args runs with the figures given on the command line."""
    connections = min(a.connections, 19_000)
    return run(a.servers.split(","), connections, a.messages, a.rounds, a.size, deflate=a.deflate)


if __name__ == "__main__":
    main()
