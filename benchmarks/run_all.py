"""run_all: every benchmark in one run, then the JSON record, the plot and BENCHMARKS.md.

``make bench`` calls this after the codec micro-benchmarks. It runs, with progress output:
idle memory (plain, then with the client offering permessage-deflate), upgrade cost, fan-out
(with the raw send() floor) and echo for lowmemws, websockets, aiohttp and picows, and a quick
scale run of lowmemws alone; writes ``benchmarks/results/<timestamp>.json``, renders
``benchmarks/results/<timestamp>.png`` and rewrites ``BENCHMARKS.md``. The million-connection
scale run is separate (``--scale-connections 1000000``, or run ``scale.py`` and pass its
``--json`` to ``--scale-record``; ``results/scale-headline.json`` is
read when present) because it takes minutes and most of the machine.

    python benchmarks/run_all.py [--quick] [--servers a,b] [--scale-connections N]
    python benchmarks/run_all.py --render benchmarks/results/<timestamp>.json  # re-render only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import echo
import fanout
import idle_cpu
import idle_memory
import procstats
import scale
import tls
import upgrade
from serverctl import ALL_SERVERS, HERE, usable, version

ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


def log(message: str) -> None:
    print(message, flush=True)


def machine() -> dict[str, Any]:
    """machine describes where the figures were measured."""
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(procstats.meminfo_kib()["MemTotal"] / 1048576, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "open_files_limit": 20_000,
    }


def step(title: str, fn: Any, *args: Any) -> Any:
    log(f"== {title}")
    start = time.monotonic()
    try:
        result = fn(*args, log=log)
    except (Exception, SystemExit) as exc:  # one failed benchmark must not lose the others
        log(f"   failed: {exc!r}")
        return {"error": repr(exc)}
    log(f"   done in {time.monotonic() - start:.0f} s")
    return result


def run(a: argparse.Namespace) -> dict[str, Any]:
    servers = a.servers.split(",")
    n = 2_000 if a.quick else 19_000
    record: dict[str, Any] = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine(),
        "versions": {s: version(s) for s in servers},
    }
    record["idle_memory"] = step("idle memory", idle_memory.run, servers, n, False)
    record["idle_memory_deflate"] = step(
        "idle memory, client offers permessage-deflate", idle_memory.run, servers, n, True
    )
    record["upgrade"] = step("upgrade cost", upgrade.run, servers, n, 1 if a.quick else 3)
    record["fanout"] = step(
        "fan-out", fanout.run, servers, n, 5 if a.quick else 20, 2 if a.quick else 5, 256
    )
    record["echo"] = step(
        "echo", echo.run, servers, 100, [256, 8192], 1.0 if a.quick else 2.0, 1 if a.quick else 3
    )
    record["fanout_deflate"] = step(
        "fan-out, 4 KiB JSON, permessage-deflate",
        lambda *args, log: fanout.run(*args, log=log, deflate=True),
        servers,
        n,
        5 if a.quick else 20,
        2 if a.quick else 5,
        4096,
    )
    record["echo_deflate"] = step(
        "echo, permessage-deflate",
        lambda *args, log: echo.run(*args, log=log, deflate=True),
        servers,
        100,
        [256, 8192],
        1.0 if a.quick else 2.0,
        1 if a.quick else 3,
    )
    if "lowmemws" in servers and usable("lowmemws")[0]:
        counts = [n // 6, n]  # 3,000 and 19,000 idle connections (quick: 333 and 2,000)
        record["idle_cpu"] = step(
            "idle CPU", idle_cpu.run, counts, 5.0 if a.quick else 10.0, ["local", "redis"]
        )
    tls_servers = [s for s in servers if s in ("lowmemws", "websockets")]
    record["tls"] = step("TLS 1.3", tls.run, tls_servers, n, 2 if a.quick else 5, "1.3")
    if a.scale_connections and "lowmemws" in servers and usable("lowmemws")[0]:
        procs = max(1, -(-a.scale_connections // 18_000))
        record["scale"] = step(
            f"scale: {a.scale_connections:,} connections, {procs} processes",
            scale.run,
            a.scale_connections,
            procs,
            10.0 if a.quick else 30.0,
            512,
        )
    add_headline(record, a.scale_record)
    return record


def add_headline(record: dict[str, Any], path: str | None) -> None:
    """add_headline attaches the separately run scale record (the million run) if present."""
    headline = path or os.path.join(RESULTS, "scale-headline.json")
    if os.path.exists(headline):
        with open(headline) as f:
            record["scale_headline"] = json.load(f)


def ok(section: Any) -> bool:
    return isinstance(section, dict) and "error" not in section


def plot(record: dict[str, Any], path: str) -> None:
    """plot draws bytes per idle connection (log scale) and the other figures, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    (a_mem, a_up), (a_fan, a_echo) = ax
    for key, offset, label in (
        ("idle_memory", -0.2, "plain"),
        ("idle_memory_deflate", 0.2, "deflate offered"),
    ):
        if ok(record.get(key)):
            rows = record[key]["rows"]
            xs = [i + offset for i in range(len(rows))]
            a_mem.bar(xs, [max(1.0, r["bytes_per_conn"]) for r in rows], 0.4, label=label)
            a_mem.set_xticks(range(len(rows)), [r["server"] for r in rows])
    a_mem.set_yscale("log")
    a_mem.axhline(64, color="green", linestyle="--", label="target 64 B")
    a_mem.set_title("user-space bytes per idle connection (log)")
    a_mem.legend()
    if ok(record.get("upgrade")):
        rows = record["upgrade"]["rows"]
        a_up.bar([r["server"] for r in rows], [r["us_per_upgrade"]["median"] for r in rows])
        a_up.set_yscale("log")
        a_up.axhline(10, color="green", linestyle="--", label="target 10 us")
        a_up.legend()
    a_up.set_title("server CPU us per upgrade (log)")
    if ok(record.get("fanout")):
        rows = record["fanout"]["rows"]
        a_fan.bar([r["server"] for r in rows], [r["frames_per_cpu_s"] for r in rows])
    a_fan.set_title("fan-out: frames per server CPU-second (256 B)")
    if ok(record.get("echo")):
        rows = record["echo"]["rows"]
        for j, size in enumerate(("256", "8192")):
            xs = [i + (j - 0.5) * 0.4 for i in range(len(rows))]
            ys = [r["sizes"][size]["us_per_message"]["median"] for r in rows]
            a_echo.bar(xs, ys, 0.4, label=f"{size} B")
        a_echo.set_xticks(range(len(rows)), [r["server"] for r in rows])
        a_echo.legend()
    a_echo.set_title("echo, 100 connections: server CPU us per message")
    fig.suptitle(f"lowmemws benchmarks, {record['timestamp']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def section(title: str, record: dict[str, Any], key: str, render: Any, note: str) -> list[str]:
    lines = [f"## {title}", "", note, ""]
    value = record.get(key)
    if not ok(value):
        lines += [f"Not measured: {value.get('error') if value else 'not run'}.", ""]
        return lines
    lines += [render(value), ""]
    for name, why in value.get("skipped", {}).items():
        lines.append(f"- {name} not measured: {why}")
    return lines + [""]


def markdown(record: dict[str, Any], png: str) -> str:
    """markdown renders BENCHMARKS.md from one run's record."""
    m = record["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    lines = [
        "# Benchmarks",
        "",
        "Generated by `benchmarks/run_all.py` (`make bench`); do not edit by hand.",
        f"Run of {record['timestamp']}: `{record['command']}`.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"CPython {m['python']}, {m['open_files_limit']:,} open files per process.",
        f"Versions: {versions}. Record: `benchmarks/results/{record['timestamp']}.json`.",
        "",
        "Every server runs with its library's defaults in a fresh process, in the same run, with "
        "the same behaviour (`benchmarks/servers/`): echo, a 64-bit user id and a subscription "
        "to one topic per connection, fan-out through the library's natural broadcast. Memory "
        "is RSS from /proc/PID/status, CPU is utime + stime from /proc/PID/stat; the load "
        "clients (`benchmarks/loadclients.py`) are separate processes on source addresses "
        "127.0.0.2, 127.0.0.3, ..., and answer every ping (websockets pings each connection "
        "every 20 s by default).",
        "",
        f"![benchmarks](benchmarks/results/{os.path.basename(png)})",
        "",
    ]
    lines += section(
        "Bytes per idle connection",
        record,
        "idle_memory",
        idle_memory.render,
        "(RSS with all connections idle - RSS after a warm-up of 500 connections) / N. "
        "`raw base` uses the RSS right after start instead. RSS columns: right after start / "
        "after warm-up / idle / after every connection closed. Kernel slab growth covers both "
        "ends of each loopback connection (client and server sockets share this kernel).",
    )
    lines += section(
        "Bytes per idle connection, client offers permessage-deflate",
        record,
        "idle_memory_deflate",
        idle_memory.render,
        "As above, with `Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits` "
        "in every Upgrade, as browsers send; `deflate` counts connections that negotiated it.",
    )
    lines += section(
        "Upgrade cost",
        record,
        "upgrade",
        upgrade.render,
        "Server CPU from before the first connect to after the last 101, divided by the "
        "upgrades; clients keep their connections during the window (the close is not "
        "counted). Median over rounds, min-max in brackets.",
    )
    lines += section(
        "Fan-out",
        record,
        "fanout",
        fanout.render,
        "One 256-byte binary message published K times (K = 20 by default, 5 rounds) to every "
        "subscriber; server CPU until "
        "every client has read every frame. The floor is a plain Python loop of non-blocking "
        "`socket.send()` of the same frame over the same number of loopback sockets "
        "(`servers/floor_server.py`), measured the same way in the same run.",
    )
    lines += section(
        "Echo",
        record,
        "echo",
        echo.render,
        "100 connections, one binary message in flight each, the same Python client for every "
        "server; messages/s is wall clock, CPU is the server's. The Python client is the "
        "bottleneck for the faster servers, so compare CPU per message.",
    )
    lines += section(
        "Fan-out with permessage-deflate",
        record,
        "fanout_deflate",
        fanout.render,
        "The clients offer permessage-deflate as browsers do; a 4 KiB JSON notification is "
        "published K times to every subscriber. A server that negotiates compression sends it "
        "compressed (lowmemws compresses it once per publish); the floor sends the same "
        "compressed bytes, compressed once outside its loop.",
    )
    lines += section(
        "Echo with permessage-deflate",
        record,
        "echo_deflate",
        echo.render,
        "As the echo above, with the clients offering permessage-deflate and sending JSON "
        "documents compressed where it was negotiated (each server with its library's default "
        "compression settings; picows does not implement it and runs uncompressed).",
    )
    lines += section(
        "TLS 1.3",
        record,
        "tls",
        tls.render,
        "`benchmarks/tls.py`: each server serves TLS itself (lowmemws: OpenSSL handshake, then "
        "its own record layer, docs/tls.md; websockets: an `ssl.SSLContext`), pings off; "
        "Python ssl clients (TLS 1.3, 4,000 connections per process). Bytes per idle "
        "connection after a warm-up of 500 TLS connections; server CPU per handshake + "
        "upgrade while all open; per echoed 64-byte message over every connection.",
    )
    lines += section(
        "Idle CPU",
        record,
        "idle_cpu",
        idle_cpu.render,
        "`benchmarks/idle_cpu.py`: CPU of one gateway process (`Gateway(...).run()`, all its "
        "threads, /proc/PID/task/TID/schedstat) while nothing happens, with the default bus and "
        "with RedisBus, without and with idle connections (heartbeat off, and at its default: "
        "pings are real work), next to the floor of a bare epoll_wait loop at the same number "
        "of wake-ups (voluntary context switches of the gateway's threads).",
    )
    scale_notes = {
        "scale": ("Scale (quick run, in this run)", "`run_all.py --scale-connections N`"),
        "scale_headline": (
            "Scale (headline, run separately)",
            "`python benchmarks/scale.py --connections 1000000 --processes 56 --window 2048 "
            "--json benchmarks/results/scale-headline.json`",
        ),
    }
    for key, (title, command) in scale_notes.items():
        if key in record:
            lines += section(
                title,
                record,
                key,
                scale.render,
                f"{command}: lowmemws alone with SO_REUSEPORT worker processes, load clients "
                "(the C worker `benchmarks/loadclient.c` unless the table says python) spread "
                "over many processes and source addresses. Bytes per connection over the "
                "whole server process tree (RSS sums count shared pages once per process; PSS "
                "splits them); kernel memory covers both ends of each loopback connection.",
            )
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--servers", default=",".join(ALL_SERVERS))
    p.add_argument("--quick", action="store_true", help="2,000 connections, fewer rounds")
    p.add_argument("--scale-connections", type=int, default=50_000, help="0 skips scale")
    p.add_argument(
        "--scale-record",
        help="a scale.py --json file (default: results/scale-headline.json, the million run)",
    )
    p.add_argument("--no-markdown", action="store_true", help="do not rewrite BENCHMARKS.md")
    p.add_argument(
        "--render", metavar="RECORD", help="measure nothing: re-render a results/*.json record"
    )
    a = p.parse_args(argv)
    if a.render:
        with open(a.render) as f:
            record = json.load(f)
        add_headline(record, a.scale_record)
        stamp, json_path = record["timestamp"], a.render
    else:
        record = run(a)
        os.makedirs(RESULTS, exist_ok=True)
        stamp = record["timestamp"].replace(":", "")
        record["timestamp"] = stamp
        json_path = os.path.join(RESULTS, f"{stamp}.json")
        with open(json_path, "w") as f:
            json.dump(record, f, indent=1)
    png = os.path.join(RESULTS, f"{stamp}.png")
    plot(record, png)
    text = markdown(record, png)
    if not a.no_markdown:
        with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as f:
            f.write(text)
    log(text)
    log(f"wrote {json_path}, {png}" + ("" if a.no_markdown else " and BENCHMARKS.md"))


if __name__ == "__main__":
    main()
