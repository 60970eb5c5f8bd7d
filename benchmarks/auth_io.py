"""auth_io: hooks that wait (issue 11), lowmemws side by side with websockets in one run.

A real on_connect checks a token against a store: a few milliseconds of waiting. This
benchmark measures what that wait costs the rest of the process. Every server is a fresh
process (benchmarks/servers/*_server.py with the flags below) stopped by PID afterwards.

1. storm: 1,000 clients upgrade at once while ONE established client echoes. The server's
   upgrade hook waits ``--delay`` (5 ms): websockets with an ``async def process_request``
   awaiting ``asyncio.sleep``; lowmemws with an ``async def`` on_connect awaiting
   ``asyncio.sleep``; lowmemws with a blocking sync on_connect (``time.sleep``) and
   ``Config(hook_threads=32)``; and the same blocking hook inline (``hook_threads=0``: the
   loop stalls; the reference row). Echo is a plain echo handler / a plain on_message, which
   with hook_threads=32 runs on the hook threads too (which take the work of open
   connections before handshakes). A diagnostic row repeats the threaded variant with an
   ``async def`` echo (run on
   the asyncio loop, not the hook threads), to tell that queueing from a stalled loop; a
   floor row runs lowmemws' sync hook with no wait at all: what a storm costs on this
   machine (the C client, the probe and the server share 2 cores) whatever the hook does.
   The storm comes from the C load client (loadclient.c, one process): it connects all 1,000
   sockets at once (window = clients) and sends each Upgrade as soon as its connect completes;
   a connection refused or reset is retried. "upgraded after" is its time from the first
   connect to the last checked 101. Meanwhile an echo probe (a thread of this process, a
   blocking socket, its own connection made before the storm) sends a 16-byte binary message
   every ``--interval`` (10 ms) and waits for its echo; the round trips that overlap the storm
   give "worst echo" and "p99 echo" ("echo before": the median in the second before it).
   ``--rounds`` storms per server, round-robin over the servers (all started first, each
   idle with its probe paused while another one is stormed, so load from elsewhere on a
   shared machine falls on every variant alike; the 1,000 connections are closed after each
   storm and the server left to settle): medians and ranges over the rounds; worst echo
   over every round, p99 over all the round trips pooled (a storm of 0.1 s holds ~10 round
   trips, so p99 is then close to the worst). Every server gets the same listen() backlog
   (``--backlog``, 4096 by default: lowmemws' default and somaxconn here). asyncio's own
   default is 100, which makes the storm a test of SYN retransmission instead: websockets
   took 1.9-2.8 s here with it (``--backlog 0``) against ~0.28 s with 4096.
2. cpu: server CPU per upgrade (utime + stime from /proc/PID/stat), upgrade.py's measurement
   (Python load clients, 128 handshakes in flight, connections kept during the measured
   window, closed after it): ``--cpu-rounds`` rounds of ``--cpu-connections`` each on one
   server, for lowmemws with an async on_connect that returns at once and with a sync one
   run inline; split into the server's main thread (the loop) and its other threads (the
   asyncio thread of the async hooks). Rounds are large (18,000) because /proc counts CPU
   in 10 ms ticks and each round carries a few ticks of fixed cost: rounds of 5,000 read
   ~20 us where rounds of 19,000 read ~16 us for the same server. "Not slower" is judged
   against ``--baseline-python`` (an interpreter with the build before the change, e.g. a
   venv of ``git archive`` of the previous commit) measured in the same run: the sync row
   may be at most 10 % above it; without one, against 17 us (0.1.0 read 15.3 us).
3. idle: bytes per idle connection at ``--idle-connections`` (19,000) connections accepted
   through an async on_connect, and through the sync one for comparison (idle_memory.py's
   measurement: RSS delta after a warm-up / N, each with a user id and a topic).

The table gives each figure beside its target from the issue; ``--json PATH`` writes every
figure (benchmarks/results/auth_io-DATE.json by convention). The machine's load average is
printed with it: the machine is shared, and other work on it moves the wall-clock figures.

    python benchmarks/auth_io.py [--parts storm,cpu,idle] [--clients 1000] [--delay 0.005]
        [--rounds 5] [--cpu-connections 18000] [--cpu-rounds 3] [--json PATH]
        [--baseline-python OTHER/.venv/bin/python --baseline-label c52d4cc]
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import socket
import statistics
import threading
import time
from typing import Any

import idle_memory
import procstats
import report
import upgrade
from loadclients import LoadClients, accept_value, client_frame, upgrade_request
from serverctl import Server, version

PARTS = ("storm", "cpu", "idle")
PROBE_SIZE = 16


def storm_variants(delay: float, threads: int) -> list[dict[str, Any]]:
    """storm_variants lists the servers of part 1: key, label, server name, server flags."""
    d = str(delay)
    blocking = "blocking " if delay > 0 else ""
    return [
        {
            "key": "websockets",
            "label": "websockets, async process_request",
            "server": "websockets",
            "args": ("--hook-delay", d),
        },
        {
            "key": "async",
            "label": "lowmemws, async on_connect",
            "server": "lowmemws",
            "args": ("--hook", "async", "--hook-delay", d),
        },
        {
            "key": "threads",
            "label": f"lowmemws, {blocking}sync on_connect, hook_threads={threads}",
            "server": "lowmemws",
            "args": ("--hook", "sync", "--hook-delay", d, "--hook-threads", str(threads)),
        },
        {
            "key": "threads-async-echo",
            "label": f"lowmemws, {blocking}sync on_connect, hook_threads={threads},"
            " async def echo (diagnostic)",
            "server": "lowmemws",
            "args": (
                "--hook",
                "sync",
                "--hook-delay",
                d,
                "--hook-threads",
                str(threads),
                "--message-hook",
                "async",
            ),
        },
        {
            "key": "inline",
            "label": f"lowmemws, {blocking}sync on_connect inline (hook_threads=0)",
            "server": "lowmemws",
            "args": ("--hook", "sync", "--hook-delay", d, "--hook-threads", "0"),
        },
        {
            "key": "floor",
            "label": "lowmemws, sync on_connect inline that does not wait (floor)",
            "server": "lowmemws",
            "args": ("--hook", "sync", "--hook-threads", "0"),
        },
    ]


CPU_VARIANTS = [
    {
        "key": "async",
        "label": "lowmemws, async on_connect, returns at once",
        "args": ("--hook", "async"),
    },
    {
        "key": "sync",
        "label": "lowmemws, sync on_connect inline, returns at once",
        "args": ("--hook", "sync", "--hook-threads", "0"),
    },
]

IDLE_VARIANTS = [
    {"key": "async", "label": "lowmemws, async on_connect", "args": ("--hook", "async")},
    {"key": "sync", "label": "lowmemws, sync on_connect inline", "args": ("--hook", "sync")},
]


class EchoProbe:
    """EchoProbe is one established WebSocket client that echoes at a fixed pace in a thread.

    While active, every ``interval`` it sends a masked 16-byte binary message and blocks
    until the echo arrives; each round trip is kept as (sent, received) in time.monotonic()
    seconds. A late echo delays the next message (one in flight at a time), as a client
    waiting for its answer would. While paused it only reads, so the server's pings are
    still answered (a paused probe's server keeps it). It starts paused.
    """

    def __init__(self, host: str, port: int, interval: float, timeout: float = 60.0) -> None:
        self.interval = interval
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(upgrade_request(host, port, "/ws?user=1", key, False))
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if lines[0].split()[1:2] != ["101"] or accept_value(key) not in head:
            raise RuntimeError(f"echo probe refused: {lines[0]!r}")
        self.samples: list[tuple[float, float]] = []
        self.error = ""
        self._active = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the echo probe's connection")
        return data

    def _take(self) -> tuple[int, bytes] | None:
        """_take removes one whole server frame from the buffer (RFC 6455 section 5.2)."""
        if len(self.buf) < 2:
            return None
        n, head = self.buf[1] & 0x7F, 2
        if n >= 126:
            head = 4 if n == 126 else 10
            if len(self.buf) < head:
                return None
            n = int.from_bytes(self.buf[2:head], "big")
        if len(self.buf) < head + n:
            return None
        opcode, payload = self.buf[0] & 0x0F, self.buf[head : head + n]
        self.buf = self.buf[head + n :]
        if opcode == 9:
            self.sock.sendall(client_frame(10, payload))
        elif opcode == 8:
            raise ConnectionError("the server closed the echo probe's connection")
        return opcode, payload

    def _echo(self, message: bytes) -> None:
        self.sock.sendall(client_frame(2, message))
        while True:
            frame = self._take()
            if frame is None:
                self.buf += self._recv()
            elif frame == (2, message):
                return

    def _idle(self) -> None:
        """_idle reads for a moment while paused: answers pings, notices a closed socket."""
        self.sock.settimeout(0.05)
        try:
            self.buf += self._recv()
        except TimeoutError:
            pass
        finally:
            self.sock.settimeout(self.timeout)
        while self._take() is not None:
            pass

    def _run(self) -> None:
        count = 0
        try:
            while not self._stop.is_set():
                if not self._active.is_set():
                    self._idle()
                    pace = time.monotonic()
                    continue
                count += 1
                message = count.to_bytes(PROBE_SIZE, "big")
                sent = time.monotonic()
                self._echo(message)
                self.samples.append((sent, time.monotonic()))
                pace = max(pace + self.interval, time.monotonic())
                self._stop.wait(max(0.0, pace - time.monotonic()))
        except (OSError, ConnectionError) as exc:
            self.error = str(exc) or type(exc).__name__
        finally:
            self._stop.set()

    def resume(self) -> None:
        """resume starts echoing (again)."""
        self._active.set()

    def pause(self) -> None:
        """pause stops echoing after the round trip in flight; pings are still answered."""
        self._active.clear()

    def alive(self) -> bool:
        """alive tells whether the probe still has its connection."""
        return not self._stop.is_set()

    def between(self, start: float, end: float) -> list[float]:
        """between returns the round trips (seconds) that overlap the window [start, end]."""
        return [r - s for s, r in list(self.samples) if s <= end and r >= start]

    def stop(self) -> None:
        """stop ends the probe's thread and its connection."""
        self._stop.set()
        self._thread.join(30)
        self.sock.close()


def percentile(values: list[float], q: float) -> float:
    """percentile returns the q-th percentile (0-100) by the nearest-rank method."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def storm_round(
    srv: Server, probe: EchoProbe, clients: int, timeout: float
) -> tuple[dict[str, Any], list[float]]:
    """storm_round runs one storm of ``clients`` upgrades; returns its figures and round trips."""
    probe.resume()
    try:
        with LoadClients(
            srv.host, srv.port, clients, engine="c", min_workers=1, per_worker=clients
        ) as lc:
            time.sleep(1.0)  # the client process is up; the probe has a quiet second to compare
            start = time.monotonic()
            opened = lc.open(window=clients, timeout=timeout)
            end = time.monotonic()
            time.sleep(0.05)
            during = probe.between(start, end)
            quiet = probe.between(start - 1.0, start - 0.01)
            lc.close()
    finally:
        probe.pause()
    figures = {
        "opened": opened["opened"],
        "failed": opened["failed"],
        "seconds": opened["seconds"],
        "echoes_during": len(during),
        "echo_worst": max(during) if during else None,
        "echo_p99": percentile(during, 99) if during else None,
        "echo_median_before": statistics.median(quiet) if quiet else None,
    }
    return figures, during


def server_said(srv: Server, lines: int = 6) -> str:
    """server_said returns the last lines a server printed (a traceback, say), on one line."""
    time.sleep(0.5)  # the server's output is read by a thread: let it catch up
    said = [line.strip() for line in srv.output if line.strip()][-lines:]
    return " | ".join(said) or "nothing"


class StormTarget:
    """StormTarget is one storm variant: its fresh server, its echo probe, its rounds so far."""

    def __init__(self, variant: dict[str, Any], args: argparse.Namespace) -> None:
        self.variant = variant
        self.extra = tuple(variant["args"])
        if args.backlog:
            self.extra += ("--backlog", str(args.backlog))
        self.rounds: list[dict[str, Any]] = []
        self.pooled: list[float] = []
        self.srv = Server(variant["server"], extra=self.extra)
        try:
            self.probe = EchoProbe(self.srv.host, self.srv.port, args.interval)
        except (OSError, RuntimeError) as exc:
            said = server_said(self.srv)
            self.srv.stop()
            raise RuntimeError(f"{exc}; the server said: {said}") from exc

    def storm(self, args: argparse.Namespace, log: Any) -> None:
        """storm runs one more storm on this variant's server."""
        procstats.wait_idle(self.srv.pid)
        figures, during = storm_round(self.srv, self.probe, args.clients, args.storm_timeout)
        if not self.probe.alive():
            raise RuntimeError(
                f"the echo probe stopped: {self.probe.error}; the server said:"
                f" {server_said(self.srv)}"
            )
        self.rounds.append(figures)
        self.pooled += during
        worst = figures["echo_worst"]
        log(
            f"  {self.variant['label']}: round {len(self.rounds)}: {figures['opened']:,}"
            f" upgraded in {figures['seconds']:.3f} s ({figures['failed']} retried), worst echo"
            f" {worst * 1000 if worst is not None else float('nan'):.1f} ms"
            f" over {figures['echoes_during']} echoes"
        )

    def close(self) -> None:
        """close ends the probe and stops the server by PID."""
        self.probe.stop()
        self.srv.stop()

    def summary(self, clients: int) -> dict[str, Any]:
        """summary gives this variant's figures over its rounds (its row of the table)."""
        rounds = self.rounds
        worsts = [r["echo_worst"] for r in rounds if r["echo_worst"] is not None]
        befores = [r["echo_median_before"] for r in rounds if r["echo_median_before"] is not None]
        v = self.variant
        return {
            "key": v["key"],
            "variant": v["label"],
            "server": v["server"],
            "version": version(v["server"]),
            "server_args": list(self.extra),
            "server_alive": self.srv.alive(),
            "rounds": rounds,
            "seconds": report.spread([r["seconds"] for r in rounds]),
            "all_upgraded": all(r["opened"] == clients for r in rounds),
            "retried": sum(r["failed"] for r in rounds),
            "echo_worst": max(worsts) if worsts else None,
            "echo_p99": percentile(self.pooled, 99) if self.pooled else None,
            "echo_median_before": statistics.median(befores) if befores else None,
            "echoes_during": len(self.pooled),
        }


def measure_storms(
    variants: list[dict[str, Any]], args: argparse.Namespace, log: Any
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """measure_storms runs part 1: every variant's fresh server is started first, then the
    rounds go round-robin over the variants (storm 1 of each, then storm 2 of each, ...), so
    that load from elsewhere on a shared machine falls on every variant alike; servers not
    under a storm are idle, their probes paused. Returns the rows and the failed variants."""
    targets: list[StormTarget] = []
    failed: dict[str, str] = {}
    try:
        for v in variants:
            try:
                targets.append(StormTarget(v, args))
            except Exception as exc:  # one broken variant must not hide the others' figures
                log(f"  {v['label']}: failed ({exc})")
                failed[v["label"]] = str(exc)
        for _ in range(args.rounds):
            for t in list(targets):
                try:
                    t.storm(args, log)
                except Exception as exc:
                    log(f"  {t.variant['label']}: failed ({exc})")
                    failed[t.variant["label"]] = str(exc)
                    targets.remove(t)
                    t.close()
        return [t.summary(args.clients) for t in targets], failed
    finally:
        for t in targets:
            t.close()


def loadavg() -> list[float]:
    """loadavg returns the 1, 5 and 15 minute load averages (/proc/loadavg)."""
    with open("/proc/loadavg") as f:
        return [float(v) for v in f.read().split()[:3]]


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """run measures the parts asked for; a failing variant is logged and listed, not fatal."""
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
        "parts": args.parts,
        "clients": args.clients,
        "delay": args.delay,
        "interval": args.interval,
        "rounds": args.rounds,
        "backlog": args.backlog,
        "hook_threads": args.hook_threads,
        "baseline_python": args.baseline_python,
        "baseline_label": args.baseline_label,
        "storm": [],
        "cpu": [],
        "idle": [],
        "failed": {},
    }

    def attempt(part: str, label: str, fn: Any) -> None:
        try:
            result[part].append(fn())
        except Exception as exc:  # one broken variant must not hide the others' figures
            log(f"  {label}: failed ({exc})")
            result["failed"][f"{part}: {label}"] = str(exc)

    if "storm" in args.parts:
        log(f"storm: {args.clients:,} upgrades at once, hook waits {args.delay * 1000:g} ms")
        variants = [
            v for v in storm_variants(args.delay, args.hook_threads) if v["key"] not in args.skip
        ]
        rows, failed = measure_storms(variants, args, log)
        result["storm"] += rows
        result["failed"].update({f"storm: {label}": why for label, why in failed.items()})
    if "cpu" in args.parts:
        log(f"cpu: {args.cpu_rounds} x {args.cpu_connections:,} upgrades per server")
        variants = list(CPU_VARIANTS)
        if args.baseline_python:
            variants.append(
                {
                    "key": "sync-baseline",
                    "label": f"lowmemws {args.baseline_label}, sync on_connect inline,"
                    " returns at once",
                    "args": ("--hook", "sync", "--hook-threads", "0"),
                    "python": args.baseline_python,
                }
            )
        for v in variants:
            if v["key"] in args.skip:
                continue
            attempt(
                "cpu",
                v["label"],
                lambda v=v: dict(
                    upgrade.measure(
                        "lowmemws",
                        args.cpu_connections,
                        args.cpu_rounds,
                        log,
                        extra=v["args"],
                        label=v["label"],
                        python=v.get("python"),
                    ),
                    key=v["key"],
                ),
            )
    if "idle" in args.parts:
        log(f"idle: {args.idle_connections:,} idle connections per server")
        for v in IDLE_VARIANTS:
            if v["key"] in args.skip:
                continue
            attempt(
                "idle",
                v["label"],
                lambda v=v: dict(
                    idle_memory.measure(
                        "lowmemws",
                        args.idle_connections,
                        False,
                        log,
                        extra=v["args"],
                        label=v["label"],
                    ),
                    key=v["key"],
                ),
            )
    result["loadavg_end"] = loadavg()
    return result


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.1f} ms"


def verdict(value: float | None, target: float, goal: float | None = None) -> str:
    """verdict compares a figure with its target (and goal): lower is better."""
    if value is None:
        return "no figure"
    if goal is not None and value <= goal:
        return "goal met"
    return "target met" if value <= target else "MISSED"


def render(result: dict[str, Any]) -> str:
    """render formats every figure as one table: figure, variant, measured, target, verdict."""
    rows: list[list[str]] = []
    storm = {r["key"]: r for r in result["storm"]}
    ref = storm.get("websockets")
    ref_s = ref["seconds"]["median"] if ref else None
    n = f"{result['clients']:,}"
    for key, r in storm.items():
        s = r["seconds"]
        measured = report.median_range(s, ".3f") + " s"
        ratio = s["median"] / ref_s if ref_s else None
        target, check = "reference", ""
        if key == "async":
            target, check = "<= 0.5x websockets (goal 0.2x)", verdict(ratio, 0.5, 0.2)
        elif key == "threads":
            target, check = "<= 1.0x websockets", verdict(ratio, 1.0)
        elif key == "inline":
            target, check = "reference (0.1.0: ~5 s)", ""
        elif key == "threads-async-echo":
            target, check = "diagnostic", ""
        elif key == "floor":
            target, check = "what no wait costs here", ""
        if ratio is not None and key != "websockets":
            measured += f" = {ratio:.2f}x"
        if not r["all_upgraded"] or r["retried"]:
            measured += f" ({r['retried']} retried{'' if r['all_upgraded'] else ', NOT all'})"
        rows.append([f"all {n} upgraded after", r["variant"], measured, target, check])
    for key, r in storm.items():
        target, check = "reference", ""
        if key == "async":
            target, check = "<= 50 ms (goal 10 ms)", verdict(r["echo_worst"], 0.05, 0.01)
        elif key == "threads":
            target, check = "<= 50 ms", verdict(r["echo_worst"], 0.05)
        elif key == "threads-async-echo":
            target = "diagnostic"
        elif key == "floor":
            target = "what no wait costs here"
        measured = (
            f"{ms(r['echo_worst'])} / p99 {ms(r['echo_p99'])}"
            f" ({r['echoes_during']} echoes; before {ms(r['echo_median_before'])})"
        )
        rows.append(["echo during the storm: worst / p99", r["variant"], measured, target, check])
    base = next((r for r in result["cpu"] if r["key"] == "sync-baseline"), None)
    for r in result["cpu"]:
        s = r["us_per_upgrade"]
        if r["key"] == "async":
            target, check = "goal <= 25 us", verdict(s["median"], 25.0)
        elif r["key"] == "sync-baseline":
            target, check = "baseline for the row above", ""
        elif base is not None:
            bound = base["us_per_upgrade"]["median"] * 1.1
            target = f"not slower than the baseline (<= {bound:.1f} us: +10 %)"
            check = verdict(s["median"], bound)
        else:
            target, check = "~15 us, not slower (0.1.0: 15.3 us)", verdict(s["median"], 17.0)
        rows.append(
            [
                f"server CPU per upgrade ({r['upgrades']:,} upgrades)",
                r["variant"],
                report.median_range(s, ".1f")
                + f" us (main thread {r['us_per_upgrade_main_thread']['median']:.1f},"
                f" other threads {r['us_per_upgrade_other_threads']['median']:.1f})",
                target,
                check,
            ]
        )
    for r in result["idle"]:
        rows.append(
            [
                f"bytes per idle connection ({r['connections']:,})",
                r["variant"],
                f"{r['bytes_per_conn']:,.1f} B (RssAnon {r['anon_bytes_per_conn']:,.1f} B)",
                "<= 64 B" if r["key"] == "async" else "comparison: the sync hook, same build",
                verdict(r["bytes_per_conn"], 64.0) if r["key"] == "async" else "",
            ]
        )
    for what, why in result["failed"].items():
        rows.append([what.split(":")[0], what.split(": ", 1)[1], f"FAILED: {why}", "", ""])
    la0, la1 = result["loadavg_start"], result.get("loadavg_end", [])
    head = (
        f"auth_io (issue 11), {result['date']}: hook waits {result['delay'] * 1000:g} ms,"
        f" {result['clients']:,} upgrades at once, echo every {result['interval'] * 1000:g} ms,"
        f" {result['rounds']} storms per server, backlog {result['backlog'] or 'default'};"
        f" lowmemws {version('lowmemws')}, websockets {version('websockets')},"
        f" python {result['python']}, {result['cpus']} CPUs;"
        f" load average {' '.join(f'{v:.2f}' for v in la0)} at the start,"
        f" {' '.join(f'{v:.2f}' for v in la1)} at the end"
    )
    table = report.table(["figure", "server / variant", "measured", "target", ""], rows)
    return head + "\n\n" + table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = report.parser(__doc__)
    p.add_argument("--parts", default=",".join(PARTS), help="any of storm,cpu,idle")
    p.add_argument(
        "--skip",
        default="",
        help="variants to leave out, in every part: websockets,async,threads,"
        "threads-async-echo,inline,floor,sync",
    )
    p.add_argument("--clients", type=int, default=1000, help="upgrades at once in a storm")
    p.add_argument("--delay", type=float, default=0.005, help="the hook's wait, seconds")
    p.add_argument("--interval", type=float, default=0.010, help="echo probe pace, seconds")
    p.add_argument("--rounds", type=int, default=5, help="storms per server")
    p.add_argument("--hook-threads", type=int, default=32, help="the threaded variant's threads")
    p.add_argument(
        "--backlog",
        type=int,
        default=4096,
        help="listen() backlog of every server (0: each library's own)",
    )
    p.add_argument("--storm-timeout", type=float, default=60.0)
    p.add_argument("--cpu-connections", type=int, default=18_000, help="upgrades per CPU round")
    p.add_argument("--cpu-rounds", type=int, default=3)
    p.add_argument("--idle-connections", type=int, default=19_000)
    p.add_argument(
        "--baseline-python",
        help="an interpreter with another build of lowmemws (the one before the change): its"
        " sync inline CPU per upgrade is measured in the same run, as the row to compare with",
    )
    p.add_argument("--baseline-label", default="baseline", help="names that build in the table")

    def run_args(a: argparse.Namespace) -> dict[str, Any]:
        a.parts = [x for x in a.parts.split(",") if x]
        a.skip = [x for x in a.skip.split(",") if x]
        unknown = set(a.parts) - set(PARTS)
        if unknown:
            p.error(f"unknown parts: {', '.join(sorted(unknown))} (one of {', '.join(PARTS)})")
        if not 1 <= a.clients <= 18_000:
            p.error("--clients must be 1 .. 18,000 (20,000 fds per process)")
        if not 1 <= a.cpu_connections <= 19_000 or not 1 <= a.idle_connections <= 19_000:
            p.error("at most 19,000 connections at a time: 20,000 fds per process")
        return run(a)

    return report.main(p, argv, run_args, render)


if __name__ == "__main__":
    main()
