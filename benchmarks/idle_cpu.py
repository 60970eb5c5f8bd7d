"""idle_cpu: what a gateway process costs while nothing happens (issue 15 "idle means idle").

One run measures, each over the same window of ``--seconds``:

- the machine's floor: a loop that only waits in ``epoll_wait`` with a timeout, in C and in
  Python, at 1 and 4 wake-ups a second (4 is what the gateway's 250 ms poll cost before),
  from which the cost of one wake-up on this machine follows;
- a gateway (``Gateway(...).run()``, default Config, one process) with the default bus and
  with a RedisBus (a throw-away redis-server on loopback), each with 0 and with the given
  numbers of idle connections (``--connections``, default 3,000 and 19,000), once with the
  heartbeat off (``ping_interval=0``) and once with the default heartbeat: pings are real
  work (a frame out and a pong in per connection every 15-30 s), so they are reported apart.

Each gateway row gives its CPU in ms per second (all of its threads, from
/proc/PID/task/TID/schedstat) and its wake-ups per second (voluntary context switches of
all its threads, /proc/PID/task/TID/status), next to the floor for that many wake-ups (the
Python loop's cost per wake-up times the row's wake-ups). The connections come from
``loadclients.py`` worker processes (which answer pings) and are not charged to the gateway.
The issue's target: <= 1 ms/s per gateway process with RedisBus and no traffic.

    python benchmarks/idle_cpu.py [--seconds 10] [--connections 3000,19000] [--json F]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

import procstats
import report
from loadclients import LoadClients
from serverctl import free_port, version

FLOOR_RATES = (1, 4)  # wake-ups a second of the floor loops
SETTLE = 2.0  # seconds after the connections open (and Redis subscribes) before measuring
FLOOR_STARTUP = 1.0  # seconds a floor loop runs before its window (interpreter start-up)
# With the heartbeat on, a connection's first ping comes 15-30 s after it opened (half to all
# of Config.ping_interval), the next ones 15-30 s after each answer: the window starts once
# the first ones are due and lasts long enough to hold about one ping per connection.
PING_SETTLE = 15.0
PING_WINDOW = 30.0
DEFAULT_PING = -1.0  # the server script's "keep Config's default heartbeat"

FLOOR_C = r"""
#include <stdlib.h>
#include <sys/epoll.h>
#include <time.h>
int main(int argc, char **argv) {
    int ms = atoi(argv[1]);
    double secs = atof(argv[2]), spent;
    int ep = epoll_create1(0);
    struct epoll_event ev[4];
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do {
        epoll_wait(ep, ev, 4, ms);
        clock_gettime(CLOCK_MONOTONIC, &t);
        spent = (double)(t.tv_sec - t0.tv_sec) + (double)(t.tv_nsec - t0.tv_nsec) / 1e9;
    } while (spent < secs);
    return 0;
}
"""

FLOOR_PY = textwrap.dedent(
    """
    import select, sys, time
    timeout, end = float(sys.argv[1]), time.monotonic() + float(sys.argv[2])
    ep = select.epoll()
    while time.monotonic() < end:
        ep.poll(timeout)
    """
)

GATEWAY = textwrap.dedent(
    """
    import sys, threading
    from lowmemws import Accept, Config, Gateway, RedisBus
    port, ping, url = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    bus = RedisBus(url) if url != "-" else None
    config = Config(ping_interval=ping) if ping >= 0 else Config()
    gateway = Gateway("127.0.0.1", port, bus=bus, config=config)
    gateway.on_connect(
        lambda request: Accept(user=int(request.params.get("user", "0")), topics=("all",))
    )

    def announce():
        ok = gateway.wait_ready(30) and (bus is None or bus.wait_ready(30))
        print("ready" if ok else "not ready", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    gateway.run()
    """
)


def loop_ms_per_s(args: list[str], seconds: float) -> float:
    """loop_ms_per_s runs a floor loop for seconds + its start-up and measures its CPU
    (ms/s) over a window of seconds once it has started (the interpreter's start-up is
    not the floor's)."""
    proc = subprocess.Popen([*args, str(seconds + 2 * FLOOR_STARTUP)])
    try:
        time.sleep(FLOOR_STARTUP)
        ms, _ = window(proc.pid, seconds)
    finally:
        proc.wait()
    return ms


def floor(seconds: float, log: Any) -> dict[str, Any]:
    """floor measures the bare wait loops (see the module docstring)."""
    rows: list[dict[str, Any]] = []
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    with tempfile.TemporaryDirectory(prefix="idle-cpu-") as tmp:
        program = None
        if cc is not None:
            source = os.path.join(tmp, "floor.c")
            with open(source, "w") as f:
                f.write(FLOOR_C)
            program = os.path.join(tmp, "floor")
            subprocess.run([cc, "-O2", "-o", program, source], check=True)
        for rate in FLOOR_RATES:
            if program is not None:
                ms = loop_ms_per_s([program, str(1000 // rate)], seconds)
                rows.append({"loop": "C epoll_wait", "wakeups_per_s": rate, "ms_per_s": ms})
            ms = loop_ms_per_s([sys.executable, "-c", FLOOR_PY, str(1 / rate)], seconds)
            rows.append({"loop": "Python epoll.poll", "wakeups_per_s": rate, "ms_per_s": ms})
            log(
                f"  floor at {rate}/s: "
                + ", ".join(f"{r['loop']} {r['ms_per_s']:.2f} ms/s" for r in rows[-2:])
            )
    slow, fast = (r for r in rows if r["loop"].startswith("Python"))
    # the slope between the two rates: a process costs something even when it hardly wakes
    per_wakeup = max(0.0, fast["ms_per_s"] - slow["ms_per_s"]) / (
        fast["wakeups_per_s"] - slow["wakeups_per_s"]
    )
    return {"rows": rows, "python_ms_per_wakeup": per_wakeup, "compiler": cc}


class Redis:
    """Redis is a throw-away redis-server on a free loopback port (no persistence)."""

    def __init__(self, directory: str) -> None:
        self.port = free_port()
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", directory]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


class Gateway:
    """Gateway is one gateway process started from the GATEWAY script."""

    def __init__(self, ping: float, redis_url: str | None) -> None:
        self.port = free_port()
        args = [sys.executable, "-c", GATEWAY, str(self.port), str(ping), redis_url or "-"]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        self.pid = self.process.pid
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if line != "ready":
            self.stop()
            raise RuntimeError(f"the gateway did not start ({line!r})")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def voluntary_switches(pid: int) -> int:
    """voluntary_switches sums voluntary_ctxt_switches over a process's live threads: each
    is the thread going to sleep, so the count says how often it woke."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def window(pid: int, seconds: float) -> tuple[float, float]:
    """window returns a process's CPU (ms/s) and wake-ups (/s) over the next seconds."""
    cpu, wakes = procstats.tree_cpu_ns(pid), voluntary_switches(pid)
    time.sleep(seconds)
    cpu, wakes = procstats.tree_cpu_ns(pid) - cpu, voluntary_switches(pid) - wakes
    return cpu / 1e6 / seconds, wakes / seconds


def settled_window(pid: int, seconds: float, pings: bool) -> tuple[float, float]:
    """settled_window measures a window once the gateway has settled (its connections made,
    Redis subscribed, the start-up work done; with pings, once they are due)."""
    time.sleep(PING_SETTLE if pings else SETTLE)
    if not pings:
        procstats.wait_idle(pid)
    return window(pid, max(seconds, PING_WINDOW) if pings else seconds)


def gateway_rows(
    bus: str, redis: Redis | None, counts: list[int], seconds: float, log: Any
) -> list[dict[str, Any]]:
    """gateway_rows measures one bus: no connections, then each count with pings off and on."""
    rows = []
    cases = [(0, 0.0)] + [(n, ping) for n in counts for ping in (0.0, DEFAULT_PING)]
    for connections, ping in cases:
        gw = Gateway(ping, redis.url if redis else None)
        try:
            if connections:
                with LoadClients("127.0.0.1", gw.port, connections) as lc:
                    opened = lc.open()["opened"]
                    ms, wakes = settled_window(gw.pid, seconds, ping != 0)
                    lc.close()
            else:
                opened = 0
                ms, wakes = settled_window(gw.pid, seconds, False)
        finally:
            gw.stop()
        row = {
            "bus": bus,
            "connections": opened,
            "pings": "off" if ping == 0 else "default",
            "ms_per_s": ms,
            "wakeups_per_s": wakes,
            "load_average": list(os.getloadavg()),
        }
        rows.append(row)
        log(
            f"  {bus}, {opened:,} connections, pings {row['pings']}: {ms:.2f} ms/s, "
            f"{wakes:.1f} wake-ups/s (load {row['load_average'][0]:.2f})"
        )
    return rows


def run(counts: list[int], seconds: float, buses: list[str], log: Any = print) -> dict[str, Any]:
    """run measures the floor, then every gateway row (see the module docstring)."""
    record: dict[str, Any] = {"version": version("lowmemws"), "seconds": seconds}
    record["floor"] = floor(seconds, log)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for bus in buses:
        if bus == "redis" and shutil.which("redis-server") is None:
            skipped["redis"] = "redis-server is not installed (make sysdeps)"
            log(f"  redis: skipped ({skipped['redis']})")
            continue
        with tempfile.TemporaryDirectory(prefix="idle-cpu-redis-") as tmp:
            redis = Redis(tmp) if bus == "redis" else None
            try:
                rows += gateway_rows(bus, redis, counts, seconds, log)
            finally:
                if redis is not None:
                    redis.stop()
    per_wakeup = record["floor"]["python_ms_per_wakeup"]
    for row in rows:
        row["floor_ms_per_s"] = row["wakeups_per_s"] * per_wakeup
    record["rows"] = rows
    record["skipped"] = skipped
    record["load_average"] = list(os.getloadavg())
    return record


def render(r: dict[str, Any]) -> str:
    """render writes the floor and the gateway rows as two Markdown tables."""
    lines = [
        f"lowmemws {r['version']}, windows of {r['seconds']:g} s; target: <= 1 ms/s per gateway "
        "process with RedisBus and no traffic.",
        "",
        "| floor loop | wake-ups/s | CPU ms/s |",
        "| --- | ---: | ---: |",
    ]
    for row in r["floor"]["rows"]:
        lines.append(f"| {row['loop']} | {row['wakeups_per_s']} | {row['ms_per_s']:.2f} |")
    lines += [
        "",
        f"One more wake-up a second of the Python loop costs "
        f"{r['floor']['python_ms_per_wakeup'] * 1e3:.0f} us of CPU a second on this machine (the "
        "slope between its two rows).",
        "",
        "| gateway | idle connections | heartbeat | CPU ms/s | wake-ups/s | floor for those "
        "wake-ups ms/s | load |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['bus']} | {row['connections']:,} | {row['pings']} | {row['ms_per_s']:.2f} | "
            f"{row['wakeups_per_s']:.1f} | {row['floor_ms_per_s']:.2f} | "
            f"{row['load_average'][0]:.2f} |"
        )
    for name, why in r.get("skipped", {}).items():
        lines.append(f"- {name} not measured: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = report.parser(__doc__)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each window")
    p.add_argument("--connections", default="3000,19000", help="idle connection counts")
    p.add_argument("--buses", default="local,redis", help="local (the default bus), redis")
    return report.main(p, argv, run_args, render)


def run_args(a: argparse.Namespace) -> dict[str, Any]:
    """run_args runs with the figures given on the command line."""
    counts = [min(int(n), 19_000) for n in a.connections.split(",") if n]
    return run(counts, a.seconds, a.buses.split(","))


if __name__ == "__main__":
    main()
